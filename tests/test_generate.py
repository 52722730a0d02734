"""KV-cache generation: cached decoding equals full recompute; processors keep the right tokens."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import generate as G
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig

BASE = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
            max_seq_len=32, attention="xla")
VARIANTS = {
    "llama_gqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", num_kv_heads=2),
    "llama_mqa_unrolled": dict(position="rope", num_kv_heads=1, scan_layers=False),
    "opt": dict(norm="layernorm", position="learned", position_offset=2, mlp="relu", use_bias=True,
                tie_embeddings=True, init_std=0.006),
    "opt_post_norm": dict(norm="layernorm", norm_position="post", position="learned", position_offset=2,
                          mlp="relu", use_bias=True, tie_embeddings=True),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True),
    "rope_window": dict(position="rope", num_kv_heads=2, sliding_window=3),
}
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26]]  # unequal -> left padding


@functools.cache
def _model(variant):
    model = build_model(ModelConfig(**{**BASE, **VARIANTS[variant]}))
    return model, jax.jit(model.init)(jax.random.key(0))


def _recompute_greedy(model, params, prompt, n):
    """Reference: one unpadded row, full forward over the whole sequence for every new token."""
    apply = jax.jit(lambda p, t, pos, seg: model.apply(p, t, pos, seg)[0])
    length = model.cfg.max_seq_len
    ids, logits = list(prompt), []
    for _ in range(n):
        buf = np.zeros((1, length), np.int32)
        buf[0, : len(ids)] = ids
        seg = (np.arange(length) < len(ids)).astype(np.int32)[None]
        step_logits = np.asarray(apply(params, buf, np.arange(length, dtype=np.int32)[None], seg))[0, len(ids) - 1]
        logits.append(step_logits)
        ids.append(int(np.argmax(step_logits)))
    return ids[len(prompt):], np.stack(logits)


def _cached(model, params, prompts, n, padding="left", **kw):
    tokens, positions, valid, lengths = G.pad_prompts(prompts, padding=padding)
    fn = G.jitted(G.decode_cached, model, max_new_tokens=n, keep_logits=True, **kw)
    out, logits, steps = fn(params, tokens, positions, valid, lengths, jax.random.key(0))
    return np.asarray(out), np.asarray(logits), int(steps)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_greedy_equals_full_recompute(variant):
    model, params = _model(variant)
    n = 8
    out, logits, steps = _cached(model, params, PROMPTS, n)
    assert steps == n
    for row, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = _recompute_greedy(model, params, prompt, n)
        assert out[row].tolist() == ref_tokens
        np.testing.assert_allclose(logits[row], ref_logits, atol=1e-4, rtol=1e-4)


def test_right_padding_and_uncached_loop_agree_with_left_padding():
    model, params = _model("llama_gqa")
    left, left_logits, _ = _cached(model, params, PROMPTS, 6)
    right, right_logits, _ = _cached(model, params, PROMPTS, 6, padding="right")
    np.testing.assert_array_equal(left, right)
    np.testing.assert_allclose(left_logits, right_logits, atol=1e-4)
    assert G.generate(model, params, PROMPTS, max_new_tokens=6, use_cache=False) == left.tolist()


def test_cache_stores_only_kv_heads_in_compute_dtype():
    model, _ = _model("llama_gqa")
    cache = model.init_cache(3, 16)
    assert cache["k"].shape == (2, 3, 16, 2, 8) and cache["k"].dtype == jnp.float32
    bf16 = build_model(dataclasses.replace(model.cfg, compute_dtype="bfloat16"))
    assert bf16.init_cache(1, 4)["v"].dtype == jnp.bfloat16


def test_learned_positions_refuse_to_run_past_max_seq_len():
    model, params = _model("opt")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        G.generate(model, params, [[1] * 30], max_new_tokens=3)
    assert len(G.generate(model, params, [[1] * 30], max_new_tokens=2)[0]) == 2
    rope_model, rope_params = _model("llama_gqa")  # rope has no table: longer is fine
    assert len(G.generate(rope_model, rope_params, [[1] * 30], max_new_tokens=4)[0]) == 4


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    probs = np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda masked: [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in np.asarray(masked)]
    assert kept(G.top_k_mask(logits, 2))[0] == {1, 3}
    assert kept(G.top_k_mask(logits, 3))[0] == {1, 3, 4}
    assert kept(G.top_p_mask(logits, 0.5))[0] == {1, 3}  # 0.4 < 0.5 <= 0.7
    assert kept(G.top_p_mask(logits, 0.7))[0] == {1, 3}  # reaching p exactly is enough
    assert kept(G.top_p_mask(logits, 0.71))[0] == {1, 3, 4}
    assert kept(G.top_p_mask(logits, 0.3))[0] == {1}  # the top token is always kept
    assert kept(G.top_p_mask(logits, 1.0))[0] == {0, 1, 2, 3, 4}
    assert kept(G.top_p_mask(logits, 0.5))[1] == {0, 1, 2, 3, 4}  # ties at the threshold are kept
    combined = G.Sampler(temperature=1.0, top_k=3, top_p=0.6).warp(logits)
    assert kept(combined)[0] == {1, 3}  # renormalised top-3: 0.47, 0.35 -> 0.82 >= 0.6
    # sampling only ever draws from the kept set
    draws = jax.vmap(lambda k: G.Sampler(1.0, 0, 0.5)(logits, k))(jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws)[:, 0].tolist()) == {1, 3}


def test_top_p_zero_keeps_only_the_top_token():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))
    for p in (0.0, -1.0, 1e-9):
        assert np.flatnonzero(np.isfinite(np.asarray(G.top_p_mask(logits, p)))).tolist() == [1]
    model, params = _model("llama_gqa")  # top_p -> 0 samples the greedy tokens
    greedy = G.generate(model, params, PROMPTS, max_new_tokens=6)
    assert G.generate(model, params, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.0, seed=1) == greedy


def test_prompt_ids_outside_the_vocabulary_are_an_error():
    model, params = _model("llama_gqa")  # vocab_size 97
    runs = (lambda prompts: G.generate(model, params, prompts, max_new_tokens=2),
            lambda prompts: G.generate(model, params, prompts, max_new_tokens=2, num_beams=2),
            lambda prompts: list(G.stream(model, params, prompts, max_new_tokens=2)))
    for bad in (97, -1):
        for run in runs:
            with pytest.raises(ValueError, match=rf"prompt 1 has token id {bad} outside the vocabulary \[0, 97\)"):
                run([[5, 6], [7, bad, 8]])
    with pytest.raises(ValueError, match=r"pad_id 97 is outside the vocabulary \[0, 97\)"):
        G.generate(model, params, PROMPTS, max_new_tokens=2, pad_id=97)  # it would fill the padding


def test_bad_requests_are_clear_errors_and_zero_new_tokens_is_empty():
    model, params = _model("llama_gqa")
    for run in (lambda: G.generate(model, params, [], max_new_tokens=2),
                lambda: list(G.stream(model, params, [], max_new_tokens=2))):
        with pytest.raises(ValueError, match="no prompts"):
            run()
    for run in (lambda: G.generate(model, params, PROMPTS, max_new_tokens=-1),
                lambda: list(G.stream(model, params, PROMPTS, max_new_tokens=-1))):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
            run()
    with pytest.raises(ValueError, match="beam search needs max_new_tokens >= 1, got 0"):
        G.generate(model, params, PROMPTS, max_new_tokens=0, num_beams=2)
    assert G.generate(model, params, PROMPTS, max_new_tokens=0) == [[], [], []]
    assert G.generate(model, params, PROMPTS, max_new_tokens=0, use_cache=False) == [[], [], []]
    assert list(G.stream(model, params, PROMPTS, max_new_tokens=0)) == []


def test_forbidden_tokens_never_appear_and_seeds_reproduce():
    model, params = _model("llama_gqa")
    greedy = G.generate(model, params, PROMPTS, max_new_tokens=10)
    forbid = sorted({t for row in greedy for t in row})
    kw = dict(max_new_tokens=10, temperature=1.5, forbidden_ids=forbid, seed=3)
    sampled = G.generate(model, params, PROMPTS, **kw)
    assert not {t for row in sampled for t in row} & set(forbid)
    assert G.generate(model, params, PROMPTS, **kw) == sampled
    assert G.generate(model, params, PROMPTS, **{**kw, "seed": 4}) != sampled


def test_eos_stops_one_row_while_others_continue_and_min_new_tokens():
    model, params = _model("llama_gqa")
    greedy = G.generate(model, params, PROMPTS, max_new_tokens=8)
    stops = lambda eos: [ref.index(eos) + 1 if eos in ref else 8 for ref in greedy]
    # an eos that one row makes early (step < 5) while another row never makes it
    eos = next(t for row in greedy for t in row[:4] if 8 in stops(t) and min(stops(t)) <= 4)
    out = G.generate(model, params, PROMPTS, max_new_tokens=8, eos_id=eos)
    assert [len(row) for row in out] == stops(eos)
    assert out == [ref[:stop] for ref, stop in zip(greedy, stops(eos))]
    late = G.generate(model, params, PROMPTS, max_new_tokens=8, eos_id=eos, min_new_tokens=5)
    assert all(eos not in row[:5] and len(row) >= 5 for row in late)
    assert G.generate(model, params, [PROMPTS[1]], max_new_tokens=8, eos_id=greedy[1][0]) == [greedy[1][:1]]


def test_repetition_penalty_and_no_repeat_ngram():
    ctx = G.Context(tokens=jnp.array([[3, 1, 3, 0]]), valid=jnp.array([[True, True, True, False]]),
                    generated=jnp.zeros((1, 4), bool), step=jnp.int32(0))
    logits = jnp.array([[2.0, -2.0, 4.0, 1.0, -1.0]])
    np.testing.assert_allclose(G.RepetitionPenalty(2.0)(logits, ctx), [[2.0, -4.0, 4.0, 0.5, -1.0]])
    # sequence 3 1 3: the bigram (3, 1) exists, so after the final 3 the token 1 is banned
    banned = np.asarray(G.NoRepeatNgram(2)(logits, ctx))
    assert np.isneginf(banned[0, 1]) and np.isfinite(np.delete(banned[0], 1)).all()
    # trigram: last two tokens (1, 3) never occurred before -> nothing banned
    assert np.isfinite(np.asarray(G.NoRepeatNgram(3)(logits, ctx))).all()
    model, params = _model("llama_gqa")
    out = G.generate(model, params, [[1, 2, 1, 2, 1, 2]], max_new_tokens=12, no_repeat_ngram=2)[0]
    seq = [1, 2, 1, 2, 1, 2] + out
    new_bigrams = [tuple(seq[i:i + 2]) for i in range(5, len(seq) - 1)]
    old_bigrams = {tuple(seq[i:i + 2]) for i in range(5)}
    assert len(set(new_bigrams)) == len(new_bigrams) and not set(new_bigrams) & old_bigrams


def test_user_processor_is_applied():
    model, params = _model("llama_gqa")

    @dataclasses.dataclass(frozen=True)
    class OnlyToken:
        token: int

        def __call__(self, logits, ctx):
            return jnp.where(jnp.arange(logits.shape[-1]) == self.token, 0.0, -jnp.inf)

    assert G.generate(model, params, PROMPTS, max_new_tokens=3, processors=[OnlyToken(42)]) == [[42] * 3] * 3


# ----------------------------------------------------------------------------- beam search


def _beams(model, params, prompts, n, **kw):
    tokens, positions, valid, lengths = G.pad_prompts(prompts)
    seqs, scores = G.jitted(G.beam_search, model, max_new_tokens=n, **kw)(params, tokens, positions, valid, lengths)
    return np.asarray(seqs), np.asarray(scores)


def _full_logprobs(model, params, ids, segment_ids):
    return jax.nn.log_softmax(model.apply(params, ids, jnp.arange(ids.shape[1])[None], segment_ids)[0][0])


def _sequence_logprob(model, params, prompt, new):
    """Summed log-prob of ``new`` after ``prompt`` from one full forward pass (no cache)."""
    ids = list(prompt) + list(new)
    buf = np.zeros((1, model.cfg.max_seq_len), np.int32)
    buf[0, : len(ids)] = ids
    logp = np.asarray(G.jitted(_full_logprobs, model)(params, buf, (np.arange(buf.shape[1]) < len(ids))[None]))
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)))


def test_one_beam_is_greedy_and_beam_scores_match_a_full_recompute():
    model, params = _model("llama_gqa")
    greedy = G.generate(model, params, PROMPTS, max_new_tokens=8)
    seqs, _ = _beams(model, params, PROMPTS, 8, num_beams=1)
    assert seqs[:, 0].tolist() == greedy
    # 3 beams over the shared, reordered cache: every beam's score is its true log-prob / length
    seqs, scores = _beams(model, params, PROMPTS, 8, num_beams=3)
    assert (np.diff(scores, axis=1) <= 0).all()
    for row, prompt in enumerate(PROMPTS):
        for beam in range(3):
            assert scores[row, beam] * 8 == pytest.approx(_sequence_logprob(model, params, prompt, seqs[row, beam]),
                                                          abs=1e-4)
        assert scores[row, 0] * 8 >= _sequence_logprob(model, params, prompt, greedy[row]) - 1e-5


def _bigram_model(table):
    """A model whose next-token distribution is ``table[previous token]``: blocks zeroed (the residual
    stream is the one-hot embedding), final RMSNorm scale 1, LM head = log table / sqrt(d_model)."""
    vocab, d = len(table), 16
    model = build_model(ModelConfig(vocab_size=vocab, d_model=d, num_layers=1, num_heads=2, num_kv_heads=2,
                                    head_dim=8, d_ff=16, max_seq_len=16, position="none", attention="xla"))
    params = jax.tree.map(jnp.zeros_like, jax.jit(model.init)(jax.random.key(0)))
    params["embed"] = jnp.eye(vocab, d)
    params["final_norm"]["scale"] = jnp.ones(d)
    params["lm_head"] = jnp.zeros((d, vocab)).at[:vocab].set(jnp.log(jnp.asarray(table)) / np.sqrt(d))
    return model, params


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    eos, vocab = 7, 8
    table = np.full((vocab, vocab), 0.02)
    table[0, [1, 2]] = 0.5, 0.4  # greedy takes 1 ...
    table[1] = (1 - 0.2) / 7
    table[1, 4] = 0.2  # ... which leads nowhere likely
    table[2, 3] = 0.9  # 2 -> 3 -> eos is the best sequence
    table[3:, eos] = 0.9
    table /= table.sum(1, keepdims=True)
    model, params = _bigram_model(table)

    def brute_force_best(n):  # every hypothesis: ends at eos or after n tokens; score = sum of log-probs
        best, frontier = (-np.inf, None), [((0,), 0.0)]
        for _ in range(n):
            grown = []
            for seq, score in frontier:
                for t in range(vocab):
                    new = (seq + (t,), score + np.log(table[seq[-1], t]))
                    (grown.append(new) if t != eos and len(seq) < n else None)
                    if t == eos or len(seq) == n:
                        best = max(best, (new[1], new[0][1:]))
            frontier = grown
        return best

    score, best = brute_force_best(4)
    assert best == (2, 3, eos)
    greedy = G.generate(model, params, [[0]], max_new_tokens=4, eos_id=eos)[0]
    assert greedy[:2] == [1, 4] and greedy != list(best)
    seqs, scores = _beams(model, params, [[0], [2]], 4, num_beams=2, eos_id=eos, length_penalty=0.0)
    assert G.trim_at_eos(seqs[0, 0].tolist(), eos) == list(best)
    assert scores[0, 0] == pytest.approx(score, abs=1e-3)  # RMSNorm's eps
    assert seqs[1, 0].tolist() == [3, eos, 0, 0]  # per-row stop: the other prompt's best ends sooner


def test_forbidden_tokens_never_appear_in_beams():
    model, params = _model("llama_gqa")
    forbid = sorted({t for row in G.generate(model, params, PROMPTS, max_new_tokens=8) for t in row})
    seqs, _ = _beams(model, params, PROMPTS, 8, num_beams=3, processors=(G.ForbidTokens(tuple(forbid)),))
    assert not set(seqs.ravel().tolist()) & set(forbid)
    with pytest.raises(ValueError, match="num_beams > 1 is deterministic"):
        G.generate(model, params, PROMPTS, max_new_tokens=2, num_beams=2, temperature=1.0)


def test_stream_yields_the_generate_tokens_step_by_step():
    model, params = _model("llama_gqa")
    eos = G.generate(model, params, PROMPTS, max_new_tokens=8)[1][2]
    kw = dict(max_new_tokens=8, eos_id=eos, temperature=1.0, top_k=20, seed=5)
    steps = np.stack(list(G.stream(model, params, PROMPTS, **kw)), axis=1).tolist()
    assert [G.trim_at_eos(row, eos) for row in steps] == G.generate(model, params, PROMPTS, **kw)


def test_sharded_decode_gives_the_single_device_tokens():
    from maxlm import sharding

    model, params = _model("llama_gqa")
    single = G.generate(model, params, PROMPTS, max_new_tokens=8)
    mesh = sharding.make_mesh(2, 2, 2)
    specs = jax.tree.map(lambda s, p: sharding.fit_spec(s, p.shape, mesh), model.param_specs(), params,
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    sharded = jax.device_put(params, sharding.named_shardings(mesh, specs))
    assert len(sharded["blocks"]["attn"]["wq"].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        assert G.generate(model, sharded, PROMPTS, max_new_tokens=8) == single

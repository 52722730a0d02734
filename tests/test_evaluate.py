"""Evaluation: perplexity and bits-per-byte against an independent computation, sliding windows,
multiple-choice scoring on a model trained on a synthetic fact set, letter scoring, bad JSONL."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxlm import evaluate as E
from maxlm import generate as G
from maxlm.data.sources import BadRecordError
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig


class CharTokenizer:
    """One id per character; eos 0, bos 1."""

    eos_id, bos_id = 0, 1
    alphabet = "\n :?.,ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé"

    def encode(self, text):
        return [self.alphabet.index(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 2] for i in ids if i >= 2)

    @property
    def vocab_size(self):
        return len(self.alphabet) + 2


TOK = CharTokenizer()
DOCS = ["Café au lait, s il vous plait? No: tea.", "abc abc abc.", "Zé."]


def _model(max_seq_len=64, seed=0):
    model = build_model(ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=8, d_ff=64, max_seq_len=max_seq_len, attention="xla"))
    return model, jax.jit(model.init)(jax.random.key(seed))


def _full_logits(model, params, ids, length):
    """Logits of one right-padded row, attending only to its first ``length`` tokens."""
    positions = jnp.arange(ids.shape[1])[None]
    return model.apply(params, ids, positions, (positions < length).astype(jnp.int32))[0][0]


def _logits(model, params, ids):
    buf = np.zeros((1, model.cfg.max_seq_len), np.int32)
    buf[0, : len(ids)] = ids
    return np.asarray(G.jitted(_full_logits, model)(params, buf, len(ids)))[: len(ids)]


def _token_losses(model, params, ids):
    """Independent: optax cross-entropy over the full logits of one sequence."""
    logits = _logits(model, params, ids[:-1])
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(ids[1:])))


def test_perplexity_and_bits_per_byte_equal_an_independent_computation():
    model, params = _model()
    docs = E.tokenize_texts(TOK, DOCS)
    result = E.perplexity(model, params, docs, batch_size=2)
    losses = np.concatenate([_token_losses(model, params, [TOK.eos_id] + TOK.encode(t)) for t in DOCS])
    nbytes = sum(len(t.encode("utf-8")) for t in DOCS)
    assert nbytes == sum(len(t) for t in DOCS) + 2  # the two 'é' are two bytes each
    assert result["tokens"] == len(losses) and result["bytes"] == nbytes
    assert result["perplexity"] == pytest.approx(math.exp(losses.mean()), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(losses.sum() / (math.log(2) * nbytes), rel=1e-5)


def test_sliding_windows_score_every_token_once_and_match_the_full_window_when_it_fits():
    rows = E.window_rows(list(range(11)), window=4, stride=2)
    assert [ids for ids, _ in rows] == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8], [6, 7, 8, 9, 10]]
    assert [mask for _, mask in rows] == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    model, params = _model()
    docs = E.tokenize_texts(TOK, DOCS[:1])  # 40 tokens: fits in a 64 window
    full = E.perplexity(model, params, docs, window=64)
    for stride in (8, 64):
        assert E.perplexity(model, params, docs, window=64, stride=stride)["perplexity"] == pytest.approx(
            full["perplexity"], rel=1e-6)
    # a 16-token window with stride 8 on the same document: every token once, each with >= 8 of context
    slid = E.perplexity(model, params, docs, window=16, stride=8)
    ids = docs[0][0]
    expected = np.concatenate([_token_losses(model, params, ids[:17])] + [
        _token_losses(model, params, ids[b:b + 17])[8:] for b in range(8, len(ids) - 17 + 8, 8)])
    assert slid["tokens"] == full["tokens"] == len(expected)
    assert slid["perplexity"] == pytest.approx(math.exp(expected.mean()), rel=1e-5)


NAMES = ["zor", "kip", "mux", "tev", "bal", "rin", "gof", "hum", "wex", "dap", "lin", "sor", "fen", "jot", "vak",
         "nim"]
COLORS = ["blue", "gold", "pink", "gray"]  # equal lengths: the summed log-prob has no length bias


def _facts():
    rng = np.random.default_rng(0)
    return [E.Question(f"What color is {name}?", tuple(COLORS), int(rng.integers(4))) for name in NAMES]


def _train_on(model, params, texts, steps):
    """Plain next-token training on the given texts (one padded batch, all of it every step)."""
    rows = [[TOK.eos_id] + TOK.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row) - 1] = row, 1.0
    tx = optax.adam(1e-2)
    positions = np.broadcast_to(np.arange(width - 1), mask.shape)

    def loss(p):
        logits, _ = model.apply(p, ids[:, :-1], positions, np.ones_like(mask, np.int32))
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]) * mask) / mask.sum()

    @jax.jit
    def run(params):
        def step(carry, _):
            p, opt = carry
            grads = jax.grad(loss)(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    return run(params)


def test_multiple_choice_scorer_is_at_chance_before_training_and_right_after():
    model, params = _model()
    facts = _facts()
    hook = E.eval_hook(model, TOK, texts=DOCS, questions=facts, batch_size=16)
    before = hook(params)
    texts = [E.choice_prompt(q.question) + " " + q.choices[q.answer] + "\n" for q in facts]
    trained = _train_on(model, params, texts, steps=300)
    after = hook(trained)
    print(f"multiple choice: before {before}, after {after}")
    assert before["eval/mc_accuracy"] <= 0.5 and after["eval/mc_accuracy"] == 1.0
    assert after["eval/mc_accuracy_norm"] == 1.0
    assert set(before) == {"eval/perplexity", "eval/bits_per_byte", "eval/mc_accuracy", "eval/mc_accuracy_norm"}


def test_letter_scoring_compares_the_letter_logits_after_a_k_shot_prompt():
    model, params = _model(max_seq_len=256)
    facts = _facts()
    sep, ids = E.letter_ids(TOK, 4)
    assert sep == " " and ids == [TOK.encode(c)[0] for c in "ABCD"]  # a char vocabulary: "Answer: " + letter
    shot = E.letter_block(facts[0], sep, True)
    assert shot == "What color is zor?\nA. blue\nB. gold\nC. pink\nD. gray\nAnswer: " + "ABCD"[facts[0].answer] + "\n\n"
    result = E.score_letters(model, params, TOK, facts[2:7], shots=facts[:2], batch_size=4)
    for q, pred in zip(facts[2:7], result["predictions"]):
        prompt = [TOK.eos_id] + TOK.encode("".join(E.letter_block(s, sep, True) for s in facts[:2])
                                           + E.letter_block(q, sep, False))
        assert pred == int(np.argmax(_logits(model, params, prompt)[-1, ids]))
    assert result["questions"] == 5 and result["shots"] == 2 and result["chance"] == 0.25
    table = E.format_table({"letters": result})
    assert "accuracy" in table and "predictions" not in table


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object, got list"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', "'question' must be a non-empty string"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "'choices' must be a list of 2 to 26"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' must be a choice index 0-1 or a letter A-B"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', "got \"C\""),
])
def test_bad_multiple_choice_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    good = json.dumps({"question": "q", "choices": ["a", "b", "c"], "answer": "b"})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(BadRecordError, match=f"{path}:3: ") as e:
        E.read_choices(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    path.write_text(good + "\n")
    assert E.read_choices(str(path)) == [E.Question("q", ("a", "b", "c"), 1)]


def test_preference_accuracy_compares_summed_completion_log_probs():
    from maxlm.data.preference import pair_rows, stack_pairs

    model, params = _model(max_seq_len=32)
    rng = np.random.default_rng(0)
    raw, rows = [], []
    for _ in range(5):  # 5 pairs with batch 2: the last batch wraps around
        prompt, chosen, rejected = (rng.integers(2, TOK.vocab_size, n).astype(np.int32) for n in (6, 5, 8))
        raw.append((prompt, chosen, rejected))
        rows.append(pair_rows({"prompt": prompt, "chosen": chosen, "chosen_mask": np.ones(5, np.float32),
                               "rejected": rejected, "rejected_mask": np.ones(8, np.float32)}, 16))
    result = E.preference_accuracy(model, params, stack_pairs(rows), batch_size=2)

    def completion_logp(prompt, completion):  # independent: optax CE over the whole sequence's logits
        losses = _token_losses(model, params, list(np.concatenate([prompt, completion])))
        return -losses[len(prompt) - 1:].sum()

    margins = np.array([completion_logp(p, c) - completion_logp(p, r) for p, c, r in raw])
    assert result["pairs"] == 5
    assert result["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert result["margin"] == pytest.approx(np.mean(margins), rel=1e-4)

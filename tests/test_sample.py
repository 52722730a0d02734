"""The end-of-run sampler: greedy, temperature and top-k are wired and seeded."""

import jax
import numpy as np
import ml_collections
from jax.sharding import NamedSharding

from maxlm.generate import Sampler
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from maxlm.train.sample import sample_text


class CharTokenizer:
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 97 for c in text]

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)


def _sample(**overrides):
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                      max_seq_len=16, attention="xla")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    sample_cfg = ml_collections.ConfigDict({**dict(prompt="ab", num_tokens=20, temperature=1.0, top_k=0), **overrides})
    return sample_text(model, params, CharTokenizer(), sample_cfg, seed=0, window=16)


def test_greedy_equals_top_k_one_and_temperature_changes_samples():
    greedy = _sample(temperature=0.0)
    assert len(greedy) == 20
    assert _sample(top_k=1) == greedy  # sampling among one candidate is greedy
    assert _sample(temperature=1.0) != greedy  # a random model's samples are not its argmax
    assert _sample(temperature=1.0) == _sample(temperature=1.0)  # seeded


def test_the_jitted_loop_equals_a_token_by_token_loop_over_a_sliding_window():
    """Prompt + samples outgrow the window: each token must see exactly the last ``window`` tokens."""
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                      max_seq_len=8, attention="xla")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(1))
    window, tokenizer, apply = 8, CharTokenizer(), jax.jit(model.apply)
    for temperature, top_k in ((0.0, 0), (1.0, 5)):
        sample_cfg = ml_collections.ConfigDict(dict(prompt="abc", num_tokens=20, temperature=temperature, top_k=top_k))
        got = sample_text(model, params, tokenizer, sample_cfg, seed=3, window=window)
        sampler = Sampler(temperature=temperature, top_k=top_k)
        ids = tokenizer.encode("abc")
        for i in range(20):
            context = ids[-window:]
            tokens = np.zeros((1, window), np.int32)
            tokens[0, : len(context)] = context
            positions = np.arange(window)[None]
            logits, _ = apply(params, tokens, positions, (positions < len(context)).astype(np.int32))
            ids.append(int(sampler(logits[:, len(context) - 1], jax.random.fold_in(jax.random.key(3), i))[0]))
        assert got == tokenizer.decode(ids[3:])


def test_replicated_params_sample_on_one_device_and_sharded_params_where_they_are():
    """Pure data parallelism samples on one replica (no repeated work); fsdp-sharded params stay sharded.
    Either way the text is the one the same params give on a single device."""
    from maxlm import sharding
    from maxlm.train.sample import _replica_device

    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                      max_seq_len=16, attention="xla")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    sample_cfg = ml_collections.ConfigDict(dict(prompt="ab", num_tokens=12, temperature=1.0, top_k=0))
    expected = sample_text(model, params, CharTokenizer(), sample_cfg, seed=0, window=16)
    assert _replica_device(params) is None  # already on one device

    for shape, replicated in (((8, 1, 1), True), ((1, 8, 1), False)):
        mesh = sharding.make_mesh(*shape)
        with jax.set_mesh(mesh):
            placed = jax.tree.map(lambda a, spec: jax.device_put(a, NamedSharding(mesh, sharding.fit_spec(spec, a.shape, mesh))),
                                  params, model.param_specs())
            assert _replica_device(placed) == (jax.devices()[0] if replicated else None)
            assert sample_text(model, placed, CharTokenizer(), sample_cfg, seed=0, window=16) == expected

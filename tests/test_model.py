"""The transformer: variants, causality, packing, scan/remat equivalence, init, parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from tests.helpers import random_batch

BASE = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
            max_seq_len=32, attention="xla")
VARIANTS = {
    "llama_gqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", num_kv_heads=2),
    "llama_mqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", num_kv_heads=1),
    "opt": dict(norm="layernorm", position="learned", position_offset=2, mlp="relu", use_bias=True,
                tie_embeddings=True, init_std=0.006),
    "opt_post_norm": dict(norm="layernorm", norm_position="post", position="learned", position_offset=2,
                          mlp="relu", use_bias=True, tie_embeddings=True),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True),
    "no_positions_window": dict(position="none", sliding_window=5),
}


def _model(**overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    model = build_model(cfg)
    return model, jax.jit(model.init)(jax.random.key(0))


def _logits(model, params, batch):
    return model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_is_causal_and_finite(variant):
    model, params = _model(**VARIANTS[variant])
    batch = random_batch(2, 16, 97)
    logits = _logits(model, params, batch)
    assert logits.shape == (2, 16, 97) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][:, 10:] = (changed["tokens"][:, 10:] + 1) % 97
    other = _logits(model, params, changed)
    np.testing.assert_allclose(logits[:, :10], other[:, :10], atol=1e-6)
    assert not np.allclose(logits[:, 10:], other[:, 10:])


@pytest.mark.parametrize("variant", ["llama_gqa", "opt"])
def test_packed_row_equals_separate_sequences(variant):
    model, params = _model(**VARIANTS[variant])
    packed = random_batch(1, 16, 97, packed=True)
    seg, pos = packed["segment_ids"][0], packed["positions"][0]
    logits = _logits(model, params, packed)[0]
    for s in (1, 2):
        idx = np.where(seg == s)[0]
        alone = {"tokens": packed["tokens"][:, idx], "positions": pos[None, idx],
                 "segment_ids": np.ones((1, len(idx)), np.int32)}
        np.testing.assert_allclose(logits[idx], _logits(model, params, alone)[0], atol=1e-5)


def _loss_and_grad(model, params, batch):
    def loss(p):
        logits = _logits(model, p, batch)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        return -jnp.sum(logp * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])  # padding never counts
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_unrolled_and_remat_agree(remat):
    model, params = _model(**VARIANTS["llama_gqa"])
    batch = random_batch(2, 16, 97)
    ref_loss, ref_grad = _loss_and_grad(model, params, batch)
    for scan in (True, False):
        other = build_model(dataclasses.replace(model.cfg, scan_layers=scan, remat=remat))
        loss, grad = _loss_and_grad(other, params, batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, ref_grad)


def test_dropout_uses_rng_and_is_off_without_it():
    model, params = _model(dropout=0.5)
    batch = random_batch(1, 8, 97)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    plain = model.apply(params, *args)[0]
    np.testing.assert_array_equal(plain, model.apply(params, *args)[0])
    a = model.apply(params, *args, jax.random.key(1))[0]
    b = model.apply(params, *args, jax.random.key(2))[0]
    assert not np.allclose(a, plain) and not np.allclose(a, b)


@pytest.mark.parametrize("scale_residual_init", [True, False])
def test_opt_init_scales_output_projections(scale_residual_init):
    model, params = _model(num_layers=8, d_model=256, d_ff=1024, head_dim=64, init_std=0.006,
                           scale_residual_init=scale_residual_init)
    std = lambda x: float(np.std(np.asarray(x)))
    out_std = 0.006 / 4 if scale_residual_init else 0.006  # 1/sqrt(2 * num_layers)
    assert std(params["blocks"]["attn"]["wq"]) == pytest.approx(0.006, rel=0.05)
    assert std(params["blocks"]["attn"]["wo"]) == pytest.approx(out_std, rel=0.05)
    assert std(params["blocks"]["mlp"]["w_down"]) == pytest.approx(out_std, rel=0.05)


@pytest.mark.parametrize("variant", sorted(VARIANTS) + ["reward"])
def test_num_params_matches_the_tree(variant):
    model, _ = _model(**VARIANTS.get(variant, dict(value_head=True)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.abstract_params()))
    assert model.cfg.num_params() == counted


def test_bfloat16_compute_keeps_float32_params():
    model, params = _model(compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    batch = random_batch(1, 8, 97)
    logits = _logits(model, params, batch)
    ref = _logits(build_model(dataclasses.replace(model.cfg, compute_dtype="float32")), params, batch)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.05)


@pytest.mark.parametrize("variant", ["llama_gqa", "no_positions_window"])
def test_pallas_attention_matches_xla(variant):
    model, params = _model(**{**VARIANTS[variant], "head_dim": 16})
    pallas = build_model(dataclasses.replace(model.cfg, attention="pallas"))
    batch = random_batch(2, 24, 97, packed=True)
    ref_loss, ref_grad = _loss_and_grad(model, params, batch)
    loss, grad = _loss_and_grad(pallas, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grad, ref_grad)


def test_rope_theta_and_param_dtype_are_used():
    model, params = _model(position="rope")
    batch = random_batch(1, 16, 97)
    other = build_model(dataclasses.replace(model.cfg, rope_theta=500.0))
    assert not np.allclose(_logits(model, params, batch), _logits(other, params, batch))
    bf16 = build_model(dataclasses.replace(model.cfg, param_dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(jax.jit(bf16.init)(jax.random.key(0))))

"""Hand-written backward passes (norms, XLA attention) against float64 autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.kernels.reference import reference_attention
from maxlm.models.attention import attention_mask, xla_attention
from maxlm.models.norm import normalize


def _plain_norm(x, scale, bias, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale
    return y if bias is None else y + bias


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_norm_value_and_gradients_match_autodiff(center):
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(keys[0], (2, 5, 16)) + 1.0
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (16,))
    bias = 0.1 * jax.random.normal(keys[2], (16,)) if center else None
    weights = jax.random.normal(keys[3], (2, 5, 16))

    def loss(norm, *args):
        return jnp.sum(jnp.sin(norm(*args, 1e-5, center)) * weights)

    diff = (0, 1, 2) if center else (0, 1)
    args = (x, scale, bias)
    got_value, got = jax.value_and_grad(lambda *a: loss(normalize, *a), diff)(*args)
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
        want_value, want = jax.value_and_grad(lambda *a: loss(_plain_norm, *a), diff)(*args64)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_norm_keeps_bfloat16_activations():
    x = jax.random.normal(jax.random.key(0), (4, 8), jnp.bfloat16)
    y, grad = jax.value_and_grad(lambda x: normalize(x, jnp.ones(8), None, 1e-5, False).astype(jnp.float32).sum())(x)
    assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_xla_attention_gradients_match_float64_reference(kv_heads):
    b, t, h, d = 2, 12, 4, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, t, kv_heads, d))
    v = jax.random.normal(keys[2], (b, t, kv_heads, d))
    weights = jax.random.normal(keys[3], (b, t, h, d))
    segments = jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])  # packing and padding
    positions = jnp.array([list(range(7)) + list(range(5)), list(range(10)) + [0, 0]])
    mask = attention_mask(segments, segments, positions, positions, causal=True, sliding_window=0)
    scale = d ** -0.5
    live = (segments > 0)[:, :, None, None]  # padding rows see nothing: compare real rows only

    def ours(q, k, v):
        return jnp.sum(xla_attention(q, k, v, mask, scale=scale) * weights * live)

    def reference(q, k, v):
        return jnp.sum(reference_attention(q, k, v, segment_ids=segments, causal=True) * weights * live)

    got = jax.grad(ours, (0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        want = jax.grad(reference, (0, 1, 2))(*(np.asarray(a, np.float64) for a in (q, k, v)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

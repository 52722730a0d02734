"""Pallas flash attention vs the float64 naive reference (CPU, Pallas interpret mode).

Outputs and gradients (dq, dk, dv through jax.vjp with a random cotangent) are compared by
relative error ||got - ref|| / ||ref|| on fresh random inputs. Explicit small blocks make the
short sequences span several blocks, so edge, interior and skipped blocks are all exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.kernels import flash_attention, flash_attention_supported, reference_attention

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def packed_segment_ids(batch: int, seq: int, seed: int) -> np.ndarray:
    """Rows like [1,1,1,2,2,3,3,3,0,0]: 1-4 documents of random length, then padding (id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        num_docs = rng.integers(1, 5)
        cuts = np.sort(rng.choice(np.arange(1, seq), size=num_docs, replace=False))
        row = np.searchsorted(cuts, np.arange(seq), side="right") + 1
        row[row > num_docs] = 0  # tokens after the last cut are padding
        rows.append(row)
    return np.stack(rows).astype(np.int32)


def relative_error(got: jax.Array, want: np.ndarray) -> float:
    """||got - want|| / ||want||, or the absolute error where want is exactly 0 (dq with window 1)."""
    got = np.asarray(got.astype(jnp.float32), np.float64)
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (scale if scale > 0 else 1.0))


def check_against_reference(
    batch, seq, heads, kv_heads, head_dim, dtype, *, causal=True, window=None, packed=False,
    block_q=None, block_k=None, backend=None, seed=0,
):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    segment_ids = packed_segment_ids(batch, seq, seed) if packed else None
    masking = dict(causal=causal, sliding_window=window)

    def attend(q, k, v):
        seg = None if segment_ids is None else jnp.asarray(segment_ids)
        return flash_attention(
            q, k, v, segment_ids=seg, block_q=block_q, block_k=block_k, backend=backend, **masking
        )

    out, vjp = jax.vjp(attend, q, k, v)
    grads = vjp(d_out)
    assert out.dtype == q.dtype and out.shape == q.shape

    with jax.enable_x64(True):
        as64 = [jnp.asarray(np.asarray(x.astype(jnp.float32)), jnp.float64) for x in (q, k, v, d_out)]
        seg64 = None if segment_ids is None else jnp.asarray(segment_ids)
        ref_out, ref_vjp = jax.vjp(
            lambda q, k, v: reference_attention(q, k, v, segment_ids=seg64, **masking), *as64[:3]
        )
        ref_grads = ref_vjp(as64[3])
        wants = [np.asarray(x) for x in (ref_out, *ref_grads)]

    tolerance = TOLERANCE[jnp.dtype(dtype).name]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), wants):
        assert got.dtype == dtype, name
        assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32)))), f"{name} has non-finite values"
        error = relative_error(got, want)
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance}"


# (batch, seq, heads, kv_heads, head_dim, dtype, causal, window, packed, block_q, block_k)
CASES = [
    pytest.param(1, 17, 2, 2, 64, jnp.float32, True, None, False, None, None, id="short-one-block"),
    pytest.param(1, 100, 4, 1, 64, jnp.float32, True, None, False, 32, 16, id="causal-gqa4-ragged"),
    pytest.param(1, 100, 8, 1, 64, jnp.float32, False, None, False, 16, 32, id="full-mqa8"),
    pytest.param(2, 77, 4, 4, 128, jnp.float32, True, None, True, 16, 16, id="packed-d128"),
    pytest.param(1, 130, 4, 2, 64, jnp.float32, True, 24, False, 32, 16, id="window24-gqa2"),
    pytest.param(1, 130, 8, 1, 128, jnp.float32, True, 50, True, 16, 32, id="window50-packed-mqa8"),
    pytest.param(1, 45, 2, 1, 64, jnp.float32, True, 1, False, 16, 16, id="window1-self-only"),
    pytest.param(1, 45, 2, 2, 64, jnp.float32, True, 1000, False, 16, 16, id="window-longer-than-seq"),
    pytest.param(2, 100, 4, 1, 64, jnp.bfloat16, True, None, True, None, None, id="bf16-packed"),
    pytest.param(1, 300, 4, 4, 128, jnp.bfloat16, True, None, False, None, None, id="bf16-causal-300"),
    pytest.param(1, 65, 4, 2, 64, jnp.float16, False, None, False, None, None, id="fp16-full"),
    pytest.param(1, 1000, 8, 2, 128, jnp.bfloat16, True, 300, True, None, None, id="long", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,dtype,causal,window,packed,block_q,block_k", CASES)
def test_matches_reference(batch, seq, heads, kv_heads, head_dim, dtype, causal, window, packed, block_q, block_k):
    check_against_reference(
        batch, seq, heads, kv_heads, head_dim, dtype, causal=causal, window=window, packed=packed,
        block_q=block_q, block_k=block_k, seed=seq + heads,
    )


@pytest.mark.parametrize(
    "seq,kv_heads,window,packed",
    [
        pytest.param(200, 1, None, False, id="tpu-causal-gqa2"),
        pytest.param(300, 2, 100, True, id="tpu-window-packed", marks=pytest.mark.slow),
    ],
)
def test_tpu_kernels_in_simulator(seq, kv_heads, window, packed):
    """The Mosaic kernels under the TPU interpreter (pltpu.InterpretParams)."""
    check_against_reference(1, seq, 2, kv_heads, 64, jnp.float32, window=window, packed=packed, backend="tpu")


def test_padding_rows_get_no_gradient():
    """With the loss ignoring padding rows (segment id 0), those rows add nothing to dk/dv."""
    batch, seq, heads, head_dim = 1, 40, 2, 64
    q, k, v = (jax.random.normal(key, (batch, seq, heads, head_dim)) for key in jax.random.split(jax.random.PRNGKey(1), 3))
    segment_ids = jnp.asarray([[1] * 15 + [2] * 15 + [0] * 10], jnp.int32)
    real = (segment_ids > 0)[:, :, None, None]

    def loss(k, v):
        out = flash_attention(q, k, v, segment_ids=segment_ids, block_q=16, block_k=16)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2)

    dk, dv = jax.grad(loss, argnums=(0, 1))(k, v)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    np.testing.assert_array_equal(dk[:, 30:], 0.0)
    np.testing.assert_array_equal(dv[:, 30:], 0.0)


@pytest.mark.parametrize(
    "q_shape,kv_shape,dtype,kwargs,message",
    [
        ((1, 16, 6, 64), (1, 16, 4, 64), jnp.float32, {}, "multiple of num_kv_heads"),
        ((1, 16, 4, 64), (1, 16, 4, 128), jnp.float32, {}, "head_dim"),
        ((1, 16, 4, 64), (1, 16, 4, 64), jnp.int32, {}, "dtypes"),
        ((1, 16, 4, 48), (1, 16, 4, 48), jnp.float32, {}, "head_dim in"),
        ((1, 16, 4, 64), (1, 32, 4, 64), jnp.float32, {}, "q_len == kv_len"),
        ((16, 4, 64), (16, 4, 64), jnp.float32, {}, "rank-4"),
        ((1, 16, 4, 64), (1, 16, 4, 64), jnp.float32, {"causal": False, "sliding_window": 4}, "requires causal"),
        ((1, 16, 4, 64), (1, 16, 4, 64), jnp.float32, {"block_q": 24}, "power of two"),
        ((1, 16, 4, 64), (1, 16, 4, 64), jnp.float32, {"segment_ids": jnp.ones((1, 15), jnp.int32)}, "segment_ids"),
    ],
)
def test_bad_inputs_raise_value_error(q_shape, kv_shape, dtype, kwargs, message):
    q = jnp.ones(q_shape, dtype)
    kv = jnp.ones(kv_shape, dtype)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, kv, kv, **kwargs)


def test_supported_reports_reasons():
    assert flash_attention_supported((2, 128, 8, 128), (2, 128, 2, 128), jnp.bfloat16, "gpu") is None
    assert flash_attention_supported((2, 128, 8, 64), (2, 128, 2, 64), jnp.float32, "tpu") is None
    assert "multiple" in flash_attention_supported((2, 128, 6, 64), (2, 128, 4, 64), jnp.bfloat16, "gpu")
    assert "dtypes" in flash_attention_supported((2, 128, 8, 64), (2, 128, 8, 64), jnp.float64, "gpu")
    assert "backend" in flash_attention_supported((2, 128, 8, 64), (2, 128, 8, 64), jnp.float32, "cuda")

"""Fused (flash) attention in Pallas: forward and backward kernels for GPU (Triton) and TPU (Mosaic).

Layout is BTNH, like `jax.nn.dot_product_attention`. Design:

* Forward: one program per query block. It walks the visible key blocks with an online softmax,
  so the score matrix is never materialised, and saves only the output and the log-sum-exp.
* Backward (`jax.custom_vjp`): probabilities are recomputed blockwise from the saved log-sum-exp.
  The dq kernel walks key blocks for one query block; the dk/dv kernel walks the query blocks
  of every query head of a KV group for one key block, so GQA/MQA never repeats K/V in memory.
* Masking: causal, sliding window (Mistral convention: a query sees keys in (pos - W, pos]) and
  packed segments. Blocks entirely outside the mask are skipped through the loop bounds; only
  blocks crossed by a mask edge (or all blocks, with segment ids) evaluate the mask.
* Ragged lengths: sequences are zero-padded to a multiple of the block size; padded keys are
  masked and padded queries get a +inf log-sum-exp in the backward, so they contribute nothing.

Softmax runs in base 2 (scores are pre-multiplied by log2(e)); all accumulation is float32.
On GPU each program loops over K/V with dynamic slices; on TPU the key (or query) loop is the
last, "arbitrary" grid axis with VMEM scratch accumulators, which lets Mosaic pipeline the DMAs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

_LOG2_E = math.log2(math.e)
# Finite, so a fully masked row gives finite garbage (never NaN) instead of exp(-inf + inf).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_MIN_BLOCK = {"gpu": 16, "tpu": 128}


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Tile shape of one kernel, plus the Triton launch parameters (ignored on TPU)."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Per-kernel parameters of the forward, dq and dk/dv kernels."""

    fwd: KernelParams
    dq: KernelParams
    dkdv: KernelParams

    def replace_blocks(self, block_q: int | None, block_k: int | None) -> Tuning:
        """Applies user block overrides to all three kernels."""
        def override(p: KernelParams) -> KernelParams:
            return dataclasses.replace(p, block_q=block_q or p.block_q, block_k=block_k or p.block_k)

        return Tuning(override(self.fwd), override(self.dq), override(self.dkdv))

    def fit_to(self, q_len: int, kv_len: int, min_block: int) -> Tuning:
        """Shrinks blocks that exceed the (power-of-two rounded) sequence lengths."""
        q_cap = max(min_block, pl.next_power_of_2(q_len))
        kv_cap = max(min_block, pl.next_power_of_2(kv_len))

        def fit(p: KernelParams) -> KernelParams:
            return dataclasses.replace(p, block_q=min(p.block_q, q_cap), block_k=min(p.block_k, kv_cap))

        return Tuning(fit(self.fwd), fit(self.dq), fit(self.dkdv))

    @property
    def pad_multiple(self) -> int:
        """Sequences are padded to this multiple; blocks are powers of two, so the max is the lcm."""
        return max(max(p.block_q, p.block_k) for p in (self.fwd, self.dq, self.dkdv))


def default_tuning(backend: str, head_dim: int) -> Tuning:
    """Block sizes per backend. GPU values won `benchmarks/attention.py --tune` on an H100 (bf16,
    causal, seq 4096); head_dim 256 is an untimed guess sized for shared memory. TPU values are
    untuned defaults."""
    if backend == "tpu":
        return Tuning(KernelParams(512, 512), KernelParams(256, 256), KernelParams(256, 256))
    if head_dim <= 64:
        return Tuning(KernelParams(64, 64, 4, 3), KernelParams(128, 32, 4, 3), KernelParams(32, 128, 4, 3))
    if head_dim <= 128:
        return Tuning(KernelParams(128, 64, 8, 3), KernelParams(64, 64, 4, 2), KernelParams(64, 64, 4, 2))
    return Tuning(KernelParams(64, 32, 4, 2), KernelParams(64, 32, 4, 2), KernelParams(32, 64, 4, 2))


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one attention call (hashable: it is a custom_vjp nondiff arg)."""

    causal: bool
    window: int | None
    scale: float
    q_len: int
    kv_len: int
    padded_q_len: int
    padded_kv_len: int
    has_segments: bool
    tuning: Tuning
    backend: str
    interpret: Any

    @property
    def score_scale(self) -> float:
        """Multiplier taking q.k to base-2 logits."""
        return self.scale * _LOG2_E


# ----------------------------------------------------------------------------- validation


def _default_backend() -> str:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def flash_attention_supported(
    q_shape: tuple[int, ...], kv_shape: tuple[int, ...], dtype: Any, backend: str | None, *, causal: bool = True
) -> str | None:
    """Returns None if `flash_attention` supports these inputs, else a one-line reason."""
    backend = backend or _default_backend()
    if backend not in _MIN_BLOCK:
        return f"flash_attention backend must be 'gpu' or 'tpu', got {backend!r}"
    if len(q_shape) != 4 or len(kv_shape) != 4:
        return f"flash_attention needs rank-4 BTNH inputs, got q {tuple(q_shape)} and k/v {tuple(kv_shape)}"
    batch, q_len, num_heads, head_dim = q_shape
    kv_batch, kv_len, num_kv_heads, kv_head_dim = kv_shape
    if batch != kv_batch:
        return f"q batch ({batch}) and k/v batch ({kv_batch}) differ"
    if head_dim != kv_head_dim:
        return f"q head_dim ({head_dim}) and k/v head_dim ({kv_head_dim}) differ"
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        return f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        return f"flash_attention supports dtypes {_SUPPORTED_DTYPES}, got {jnp.dtype(dtype).name}"
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        return f"flash_attention needs head_dim in {_SUPPORTED_HEAD_DIMS}, got {head_dim}"
    if causal and q_len != kv_len:
        return f"causal flash_attention needs q_len == kv_len, got {q_len} and {kv_len}"
    if q_len == 0 or kv_len == 0:
        return "flash_attention needs non-empty sequences"
    return None


def _input_error(q, k, v, segment_ids, causal, sliding_window, backend, block_q, block_k) -> str | None:
    """Everything `flash_attention_supported` checks, plus the per-call arguments."""
    if k.shape != v.shape:
        return f"k and v shapes differ: {k.shape} vs {v.shape}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    reason = flash_attention_supported(q.shape, k.shape, q.dtype, backend, causal=causal)
    if reason:
        return reason
    if segment_ids is not None:
        if segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            return f"segment_ids must be integer [batch, q_len] = {q.shape[:2]}, got {segment_ids.dtype}{segment_ids.shape}"
        if q.shape[1] != k.shape[1]:
            return "segment_ids need q_len == kv_len"
    if sliding_window is not None:
        if not causal:
            return "sliding_window requires causal=True"
        if int(sliding_window) < 1:
            return f"sliding_window must be >= 1, got {sliding_window}"
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (block < _MIN_BLOCK[backend] or block & (block - 1)):
            return f"{name} must be a power of two >= {_MIN_BLOCK[backend]} on {backend}, got {block}"
    return None


# ----------------------------------------------------------------------------- shared pieces


def _dot(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """a @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _dot_nt(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _div(a, b: int):
    """Division of non-negative ints; lax.div truncates, which avoids floor division's sign op."""
    return lax.div(a, jnp.asarray(b, a.dtype)) if isinstance(a, jax.Array) else a // b


def _cdiv(a, b: int):
    return _div(a + b - 1, b)


def _visible(spec: _Spec, q_pos, k_pos, q_seg, kv_seg) -> jax.Array:
    """Attention mask from broadcastable query/key positions (and segment ids, if any)."""
    visible = k_pos < spec.kv_len
    if spec.causal:
        visible &= k_pos <= q_pos
    if spec.window is not None:
        visible &= q_pos - k_pos < spec.window
    if spec.has_segments:
        visible &= q_seg == kv_seg
    return visible


def _kv_block_range(spec: _Spec, q_start, block_q: int, block_k: int):
    """Key blocks a query block [q_start, q_start + block_q) must visit: (lo, full_lo, full_hi, hi).

    Blocks in [lo, hi) are visited; those in [full_lo, full_hi) are entirely visible (no mask).
    """
    q_last = q_start + block_q - 1
    lo, full_lo = 0, 0
    hi, full_hi = _cdiv(spec.kv_len, block_k), spec.kv_len // block_k
    if spec.causal:
        hi = jnp.minimum(hi, _div(q_last, block_k) + 1)
        full_hi = jnp.minimum(full_hi, _div(q_start + 1, block_k))
    if spec.window is not None:
        lo = _div(jnp.maximum(q_start - spec.window + 1, 0), block_k)
        full_lo = _cdiv(jnp.maximum(q_last - spec.window + 1, 0), block_k)
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _q_block_range(spec: _Spec, k_start, block_q: int, block_k: int):
    """Query blocks that see a key block [k_start, k_start + block_k): (lo, full_lo, full_hi, hi)."""
    k_last = k_start + block_k - 1
    lo, full_lo = 0, 0
    hi = full_hi = _cdiv(spec.q_len, block_q)
    if spec.causal:
        lo = _div(k_start, block_q)
        full_lo = _cdiv(k_last, block_q)
    if spec.window is not None:
        hi = jnp.minimum(hi, _div(k_last + spec.window - 1, block_q) + 1)
        full_hi = _div(k_start + spec.window, block_q)
    # A block holding padded keys (kv_len - k_start < block_k) gets no unmasked range.
    full_hi = jnp.minimum(full_hi, _div(spec.kv_len - k_start, block_k) * hi)
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _loop_over_blocks(spec: _Spec, block_range, step: Callable, carry):
    """Runs `step(index, carry, masked)` over masked edge blocks and unmasked interior blocks."""
    lo, full_lo, full_hi, hi = block_range
    masked, unmasked = functools.partial(step, masked=True), functools.partial(step, masked=False)
    if spec.has_segments:
        return lax.fori_loop(lo, hi, masked, carry)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, unmasked, carry)
    return lax.fori_loop(full_hi, hi, masked, carry)


def _online_softmax_step(s, v, m, l, acc, precision):
    """Folds one block of base-2 scores s [bq, bk] into the running max m, sum l and output acc."""
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l = correction * l + p.sum(axis=1, keepdims=True)
    acc = correction * acc + _dot(p.astype(v.dtype), v, precision)
    return m_new, l, acc


def _split_refs(refs, num_inputs: int, has_segments: bool):
    """(inputs, (q_seg, kv_seg), rest): segment refs follow the inputs when present, else None."""
    inputs, rest = refs[:num_inputs], refs[num_inputs:]
    if not has_segments:
        return inputs, (None, None), rest
    return inputs, rest[:2], rest[2:]


def _precision(dtype) -> lax.Precision | None:
    """Full float32 matmuls for float32 inputs (Triton would use TF32 otherwise)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _pad_seq(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------- GPU (Triton)


def _gpu_fwd_kernel(*refs, spec: _Spec, precision):
    (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), (o_ref, lse_ref) = _split_refs(refs, 3, spec.has_segments)
    block_q, block_k = spec.tuning.fwd.block_q, spec.tuning.fwd.block_k
    # Query blocks run last-first: under a causal mask the longest rows start first.
    q_start = (pl.num_programs(0) - 1 - pl.program_id(0)) * block_q
    q = q_ref[...]
    q_pos = (q_start + jnp.arange(block_q))[:, None]
    q_seg = q_seg_ref[...][:, None] if spec.has_segments else None

    def step(j, carry, masked):
        k_start = pl.multiple_of(j * block_k, block_k)
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot_nt(q, k_ref[pl.ds(k_start, block_k), :], precision) * spec.score_scale
        if masked:
            kv_seg = kv_seg_ref[pl.ds(k_start, block_k)][None, :] if spec.has_segments else None
            k_pos = (k_start + jnp.arange(block_k))[None, :]
            s = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s, _MASK_VALUE)
        return _online_softmax_step(s, v, *carry, precision)

    init = (
        jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, l, acc = _loop_over_blocks(spec, _kv_block_range(spec, q_start, block_q, block_k), step, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)).reshape(block_q)


def _gpu_dq_kernel(*refs, spec: _Spec, precision):
    inputs, (q_seg_ref, kv_seg_ref), (dq_ref,) = _split_refs(refs, 6, spec.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    block_q, block_k = spec.tuning.dq.block_q, spec.tuning.dq.block_k
    q_start = (pl.num_programs(0) - 1 - pl.program_id(0)) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = (q_start + jnp.arange(block_q))[:, None]
    q_seg = q_seg_ref[...][:, None] if spec.has_segments else None

    def step(j, dq, masked):
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot_nt(q, k, precision) * spec.score_scale
        if masked:
            kv_seg = kv_seg_ref[pl.ds(k_start, block_k)][None, :] if spec.has_segments else None
            k_pos = (k_start + jnp.arange(block_k))[None, :]
            s = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s, _MASK_VALUE)
        p = jnp.exp2(s - lse)
        ds = p * (_dot_nt(do, v, precision) - delta)
        return dq + _dot(ds.astype(k.dtype), k, precision)

    block_range = _kv_block_range(spec, q_start, block_q, block_k)
    dq = _loop_over_blocks(spec, block_range, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _gpu_dkdv_kernel(*refs, spec: _Spec, precision, group: int):
    """One key block of one KV head; q/do/lse/delta refs hold the whole sequence of its `group` q heads."""
    inputs, (q_seg_ref, kv_seg_ref), (dk_ref, dv_ref) = _split_refs(refs, 6, spec.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    block_q, block_k = spec.tuning.dkdv.block_q, spec.tuning.dkdv.block_k
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_pos = (k_start + jnp.arange(block_k))[:, None]
    kv_seg = kv_seg_ref[...][:, None] if spec.has_segments else None

    # Transposed orientation (keys on rows) keeps every matmul in NN or NT form.
    def step(i, carry, head, masked):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(q_start, block_q), head, :]
        do = do_ref[pl.ds(q_start, block_q), head, :]
        lse = lse_ref[head, pl.ds(q_start, block_q)][None, :]
        delta = delta_ref[head, pl.ds(q_start, block_q)][None, :]
        s_t = _dot_nt(k, q, precision) * spec.score_scale
        if masked:
            q_seg = q_seg_ref[pl.ds(q_start, block_q)][None, :] if spec.has_segments else None
            q_pos = (q_start + jnp.arange(block_q))[None, :]
            s_t = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s_t, _MASK_VALUE)
        p_t = jnp.exp2(s_t - lse)
        dv = dv + _dot(p_t.astype(do.dtype), do, precision)
        ds_t = p_t * (_dot_nt(v, do, precision) - delta)
        return dk + _dot(ds_t.astype(q.dtype), q, precision), dv

    block_range = _q_block_range(spec, k_start, block_q, block_k)

    def per_head(head, carry):
        return _loop_over_blocks(spec, block_range, functools.partial(step, head=head), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_call(kernel, params: KernelParams, spec: _Spec, grid, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=spec.interpret,
        name=name,
    )


def _gpu_forward(q, k, v, segment_ids, spec: _Spec):
    batch, _, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    params = spec.tuning.fwd
    block_q, kv_len = params.block_q, spec.padded_kv_len
    grid = (_cdiv(spec.q_len, block_q), batch, num_heads)
    num_q_blocks = grid[0]

    def q_block(i, b, h):
        return b, num_q_blocks - 1 - i, h, 0

    in_specs = [
        pl.BlockSpec((None, block_q, None, head_dim), q_block),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, _div(h, group), 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, _div(h, group), 0)),
    ]
    args = [_pad_seq(q, spec.padded_q_len, 1), _pad_seq(k, kv_len, 1), _pad_seq(v, kv_len, 1)]
    if spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, num_q_blocks - 1 - i)),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
        args += [_pad_seq(segment_ids, spec.padded_q_len, 1), _pad_seq(segment_ids, kv_len, 1)]
    out, lse = _gpu_call(
        functools.partial(_gpu_fwd_kernel, spec=spec, precision=_precision(q.dtype)),
        params,
        spec,
        grid,
        in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, head_dim), q_block),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, num_q_blocks - 1 - i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(args[0].shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, spec.padded_q_len), jnp.float32),
        ],
        name="flash_attention_fwd",
    )(*args)
    return out[:, : spec.q_len], lse[:, :, : spec.q_len]


def _gpu_backward(q, k, v, segment_ids, lse, delta, d_out, spec: _Spec):
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q_len, kv_len = spec.padded_q_len, spec.padded_kv_len
    q, d_out = _pad_seq(q, q_len, 1), _pad_seq(d_out, q_len, 1)
    k, v = _pad_seq(k, kv_len, 1), _pad_seq(v, kv_len, 1)
    segments = []
    if spec.has_segments:
        segments = [_pad_seq(segment_ids, q_len, 1), _pad_seq(segment_ids, kv_len, 1)]
    precision = _precision(q.dtype)

    dq_params = spec.tuning.dq
    num_q_blocks = _cdiv(spec.q_len, dq_params.block_q)

    def q_block(i, b, h):
        return b, num_q_blocks - 1 - i, h, 0

    def q_row(i, b, h):
        return b, h, num_q_blocks - 1 - i

    full_kv = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, _div(h, group), 0))
    dq_block = pl.BlockSpec((None, dq_params.block_q, None, head_dim), q_block)
    dq_row = pl.BlockSpec((None, None, dq_params.block_q), q_row)
    segment_specs = [
        pl.BlockSpec((None, dq_params.block_q), lambda i, b, h: (b, num_q_blocks - 1 - i)),
        pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
    ]
    dq = _gpu_call(
        functools.partial(_gpu_dq_kernel, spec=spec, precision=precision),
        dq_params,
        spec,
        grid=(num_q_blocks, batch, num_heads),
        in_specs=[dq_block, full_kv, full_kv, dq_block, dq_row, dq_row] + segment_specs[: len(segments)],
        out_specs=dq_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
    )(q, k, v, d_out, lse, delta, *segments)

    dkdv_params = spec.tuning.dkdv
    block_k = dkdv_params.block_k
    group_seq = pl.BlockSpec((None, q_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    group_rows = pl.BlockSpec((None, group, q_len), lambda j, b, h: (b, h, 0))
    kv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
    segment_specs = [
        pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
    ]
    dk, dv = _gpu_call(
        functools.partial(_gpu_dkdv_kernel, spec=spec, precision=precision, group=group),
        dkdv_params,
        spec,
        grid=(_cdiv(spec.kv_len, block_k), batch, num_kv_heads),
        in_specs=[group_seq, kv_block, kv_block, group_seq, group_rows, group_rows] + segment_specs[: len(segments)],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="flash_attention_dkdv",
    )(q, k, v, d_out, lse, delta, *segments)
    return dq[:, : spec.q_len], dk[:, : spec.kv_len], dv[:, : spec.kv_len]


# ----------------------------------------------------------------------------- TPU (Mosaic)
#
# Arrays are transposed to [batch, heads, seq, head_dim]. The reduction axis (keys for the
# forward and dq, the group's heads and query blocks for dk/dv) is the last grid axis; blocks
# outside the mask are skipped with `pl.when`, and their index_map is clamped into the visited
# range so the pipeline issues no DMA for them. Every visited block evaluates the mask.
# Row vectors (lse, delta, segment ids) come in two free reshapes: [.., seq, 1] for columns and
# [.., 1, seq] for rows, so no kernel transposes a vector.


def _tpu_fwd_kernel(*refs, spec: _Spec, precision):
    (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), rest = _split_refs(refs, 3, spec.has_segments)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    block_q, block_k = spec.tuning.fwd.block_q, spec.tuning.fwd.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, _, _, hi = _kv_block_range(spec, i * block_q, block_q, block_k)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s = _dot_nt(q_ref[...], k_ref[...], precision) * spec.score_scale
        q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        q_seg, kv_seg = (q_seg_ref[...], kv_seg_ref[...]) if spec.has_segments else (None, None)
        s = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s, _MASK_VALUE)
        m_ref[...], l_ref[...], acc_ref[...] = _online_softmax_step(
            s, v_ref[...], m_ref[...], l_ref[...], acc_ref[...], precision
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log2(l_ref[...])


def _tpu_dq_kernel(*refs, spec: _Spec, precision):
    inputs, (q_seg_ref, kv_seg_ref), (dq_ref, dq_acc_ref) = _split_refs(refs, 6, spec.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    block_q, block_k = spec.tuning.dq.block_q, spec.tuning.dq.block_k
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    lo, _, _, hi = _kv_block_range(spec, i * block_q, block_q, block_k)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        k = k_ref[...]
        s = _dot_nt(q_ref[...], k, precision) * spec.score_scale
        q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        q_seg, kv_seg = (q_seg_ref[...], kv_seg_ref[...]) if spec.has_segments else (None, None)
        s = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s, _MASK_VALUE)
        p = jnp.exp2(s - lse_ref[...])
        ds = p * (_dot_nt(do_ref[...], v_ref[...], precision) - delta_ref[...])
        dq_acc_ref[...] += _dot(ds.astype(k.dtype), k, precision)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * spec.scale).astype(dq_ref.dtype)


def _tpu_dkdv_kernel(*refs, spec: _Spec, precision):
    inputs, (q_seg_ref, kv_seg_ref), rest = _split_refs(refs, 6, spec.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = rest
    block_q, block_k = spec.tuning.dkdv.block_q, spec.tuning.dkdv.block_k
    j, head, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (head == 0) & (i == 0)
    last = (head == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    lo, _, _, hi = _q_block_range(spec, j * block_k, block_q, block_k)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = _dot_nt(k_ref[...], q, precision) * spec.score_scale
        k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
        q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
        q_seg, kv_seg = (q_seg_ref[...], kv_seg_ref[...]) if spec.has_segments else (None, None)
        s_t = jnp.where(_visible(spec, q_pos, k_pos, q_seg, kv_seg), s_t, _MASK_VALUE)
        p_t = jnp.exp2(s_t - lse_ref[...])
        dv_acc_ref[...] += _dot(p_t.astype(do.dtype), do, precision)
        ds_t = p_t * (_dot_nt(v_ref[...], do, precision) - delta_ref[...])
        dk_acc_ref[...] += _dot(ds_t.astype(q.dtype), q, precision)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _to_bnth(x: jax.Array, length: int) -> jax.Array:
    return _pad_seq(x.transpose(0, 2, 1, 3), length, 2)


def _tpu_call(kernel, spec: _Spec, grid, in_specs, out_specs, out_shape, scratch_shapes, name: str):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch_shapes,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
        ),
        interpret=spec.interpret,
        name=name,
    )


def _tpu_segment_args(segment_ids, spec: _Spec):
    """Segment ids as a [b, q_len, 1] column for queries and a [b, 1, kv_len] row for keys."""
    q_seg = _pad_seq(segment_ids, spec.padded_q_len, 1)[:, :, None]
    kv_seg = _pad_seq(segment_ids, spec.padded_kv_len, 1)[:, None, :]
    return q_seg, kv_seg


def _tpu_forward(q, k, v, segment_ids, spec: _Spec):
    batch, _, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    block_q, block_k = spec.tuning.fwd.block_q, spec.tuning.fwd.block_k

    def kv_index(b, h, i, j):
        lo, _, _, hi = _kv_block_range(spec, i * block_q, block_q, block_k)
        return b, _div(h, group), jnp.clip(j, lo, hi - 1), 0

    q_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim), kv_index)
    in_specs = [q_block, kv_block, kv_block]
    args = [_to_bnth(q, spec.padded_q_len), _to_bnth(k, spec.padded_kv_len), _to_bnth(v, spec.padded_kv_len)]
    if spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)[2])),
        ]
        args += _tpu_segment_args(segment_ids, spec)
    out, lse = _tpu_call(
        functools.partial(_tpu_fwd_kernel, spec=spec, precision=_precision(q.dtype)),
        spec,
        grid=(batch, num_heads, _cdiv(spec.q_len, block_q), _cdiv(spec.kv_len, block_k)),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(args[0].shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, spec.padded_q_len, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
        name="flash_attention_fwd",
    )(*args)
    return out[:, :, : spec.q_len].transpose(0, 2, 1, 3), lse[:, :, : spec.q_len, 0]


def _tpu_backward(q, k, v, segment_ids, lse, delta, d_out, spec: _Spec):
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    precision = _precision(q.dtype)
    q, d_out = _to_bnth(q, spec.padded_q_len), _to_bnth(d_out, spec.padded_q_len)
    k, v = _to_bnth(k, spec.padded_kv_len), _to_bnth(v, spec.padded_kv_len)
    segments = _tpu_segment_args(segment_ids, spec) if spec.has_segments else ()

    block_q, block_k = spec.tuning.dq.block_q, spec.tuning.dq.block_k

    def kv_index(b, h, i, j):
        lo, _, _, hi = _kv_block_range(spec, i * block_q, block_q, block_k)
        return b, _div(h, group), jnp.clip(j, lo, hi - 1), 0

    q_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
    q_column = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j: (b, h, i, 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim), kv_index)
    segment_specs = [
        pl.BlockSpec((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)[2])),
    ]
    dq = _tpu_call(
        functools.partial(_tpu_dq_kernel, spec=spec, precision=precision),
        spec,
        grid=(batch, num_heads, _cdiv(spec.q_len, block_q), _cdiv(spec.kv_len, block_k)),
        in_specs=[q_block, kv_block, kv_block, q_block, q_column, q_column] + segment_specs[: len(segments)],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
        name="flash_attention_dq",
    )(q, k, v, d_out, lse[..., None], delta[..., None], *segments)

    block_q, block_k = spec.tuning.dkdv.block_q, spec.tuning.dkdv.block_k

    def q_index(b, h, j, g, i):
        lo, _, _, hi = _q_block_range(spec, j * block_k, block_q, block_k)
        return b, h * group + g, jnp.clip(i, lo, hi - 1)

    def q_block_index(b, h, j, g, i):
        return (*q_index(b, h, j, g, i), 0)

    def q_row_index(b, h, j, g, i):
        b, h, i = q_index(b, h, j, g, i)
        return b, h, 0, i

    q_block = pl.BlockSpec((None, None, block_q, head_dim), q_block_index)
    q_row = pl.BlockSpec((None, None, 1, block_q), q_row_index)
    kv_block = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, g, i: (b, h, j, 0))
    segment_specs = [
        pl.BlockSpec((None, 1, block_q), lambda b, h, j, g, i: (b, 0, q_index(b, h, j, g, i)[2])),
        pl.BlockSpec((None, block_k, 1), lambda b, h, j, g, i: (b, j, 0)),
    ]
    # Keys are the rows here: queries' ids become a row, keys' ids a column.
    segments = tuple(x.transpose(0, 2, 1) for x in segments)
    dk, dv = _tpu_call(
        functools.partial(_tpu_dkdv_kernel, spec=spec, precision=precision),
        spec,
        grid=(batch, num_kv_heads, _cdiv(spec.kv_len, block_k), group, _cdiv(spec.q_len, block_q)),
        in_specs=[q_block, kv_block, kv_block, q_block, q_row, q_row] + segment_specs[: len(segments)],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
        name="flash_attention_dkdv",
    )(q, k, v, d_out, lse[:, :, None, :], delta[:, :, None, :], *segments)

    def to_btnh(x, length):
        return x[:, :, :length].transpose(0, 2, 1, 3)

    return to_btnh(dq, spec.q_len), to_btnh(dk, spec.kv_len), to_btnh(dv, spec.kv_len)


# ----------------------------------------------------------------------------- custom VJP and API

_BACKENDS = {"gpu": (_gpu_forward, _gpu_backward), "tpu": (_tpu_forward, _tpu_backward)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, spec: _Spec):
    return _BACKENDS[spec.backend][0](q, k, v, segment_ids, spec)[0]


def _attention_fwd(q, k, v, segment_ids, spec: _Spec):
    out, lse = _BACKENDS[spec.backend][0](q, k, v, segment_ids, spec)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(spec: _Spec, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    # delta_i = sum_j P_ij dP_ij = do_i . o_i; [batch, heads, q_len] like lse.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    # Padded query rows get lse = +inf, hence probability 0 and no gradient contribution.
    lse = _pad_seq(lse, spec.padded_q_len, 2, value=jnp.inf)
    delta = _pad_seq(delta, spec.padded_q_len, 2)
    dq, dk, dv = _BACKENDS[spec.backend][1](q, k, v, segment_ids, lse, delta, d_out.astype(q.dtype), spec)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    tuning: Tuning | None = None,
) -> jax.Array:
    """Memory-efficient softmax attention, differentiable, in BTNH layout.

    Args:
      q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim],
        num_heads a multiple of num_kv_heads (query head h reads KV head _div(h, group)).
      segment_ids: optional int [batch, q_len] (needs q_len == kv_len); tokens attend only within
        their segment. Id 0 (padding) is a segment like any other, so padding rows stay finite.
      causal: keys at positions <= the query position only.
      sliding_window: W, so a query also sees only keys > position - W (requires causal).
      scale: score multiplier, default 1/sqrt(head_dim).
      block_q, block_k: override the tile sizes of all three kernels (powers of two).
      interpret: run the kernels in the Pallas interpreter; default: True on CPU.
      backend: 'gpu' (Triton lowering; also used on CPU) or 'tpu' (Mosaic); default from the platform.
      tuning: full per-kernel parameters (see `default_tuning`), for benchmarks.
    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    backend = backend or _default_backend()
    reason = _input_error(q, k, v, segment_ids, causal, sliding_window, backend, block_q, block_k)
    if reason:
        raise ValueError(reason)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if backend == "tpu" and interpret is True:
        interpret = pltpu.InterpretParams()  # the TPU simulator
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    tuning = (tuning or default_tuning(backend, head_dim)).replace_blocks(block_q, block_k)
    tuning = tuning.fit_to(q_len, kv_len, _MIN_BLOCK[backend])
    spec = _Spec(
        causal=causal,
        window=None if sliding_window is None else int(sliding_window),
        scale=float(head_dim**-0.5 if scale is None else scale),
        q_len=q_len,
        kv_len=kv_len,
        padded_q_len=_cdiv(q_len, tuning.pad_multiple) * tuning.pad_multiple,
        padded_kv_len=_cdiv(kv_len, tuning.pad_multiple) * tuning.pad_multiple,
        has_segments=segment_ids is not None,
        tuning=tuning,
        backend=backend,
        interpret=interpret,
    )
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention(q, k, v, segment_ids, spec)

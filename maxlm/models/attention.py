"""Attention implementations behind one function, chosen by ``model.attention``.

All take BTNH arrays: q ``[batch, q_len, heads, head_dim]``, k/v
``[batch, kv_len, kv_heads, head_dim]`` with ``heads % kv_heads == 0`` (GQA
without repeating K/V), and ``segment_ids`` ``[batch, len]`` (0 = padding;
tokens attend only inside their own segment).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from maxlm import sharding
from maxlm.sharding import Rules

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


def attention_mask(q_segments, kv_segments, q_positions, kv_positions, *, causal: bool,
                   sliding_window: int) -> jax.Array:
    """Boolean ``[batch, q_len, kv_len]`` mask: same segment, causal, inside the window."""
    mask = q_segments[:, :, None] == kv_segments[:, None, :]
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    if sliding_window:
        mask &= kv_positions[:, None, :] > q_positions[:, :, None] - sliding_window
    return mask


def xla_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Plain einsum softmax attention in float32; K/V heads are shared by groups of q heads.

    The backward pass is written out (see ``_xla_attention_backward``): autodiff of the softmax
    reduces over ``[.., q_len, kv_len]`` probabilities, where the standard identity needs only a
    ``[.., q_len]`` row sum of ``dout * out``, which is cheaper on CPU and in memory traffic.
    """
    return _xla_attention(q, k, v, mask, scale)


# Masked scores get this added: exp() of it is 0, and adding it to any real score stays finite.
_MASKED = -1e30


def _subscripts(groups: int) -> tuple[str, str, str]:
    """Einsum subscripts of (q, k/v, scores). MHA keeps 4-D operands: a grouped 5-D form with groups
    of one costs XLA:CPU transposing copies of the scores."""
    return ("bthd", "bshd", "bhts") if groups == 1 else ("btkgd", "bskd", "bkgts")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_attention(q, k, v, mask, scale):
    return _xla_attention_forward(q, k, v, mask, scale)[0]


def _xla_attention_forward(q, k, v, mask, scale):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qs, kvs, ss = _subscripts(h // kv_heads)
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, d) if len(qs) == 5 else q
    # the mask as an additive bias, which XLA fuses into the scores' dot (a select it would not)
    bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32).reshape(b, *(1,) * (len(ss) - 3), *mask.shape[1:])
    scores = jnp.einsum(f"{qs},{kvs}->{ss}", grouped, k, preferred_element_type=jnp.float32) * scale + bias
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(f"{ss},{kvs}->{qs}", probs.astype(v.dtype), v).reshape(b, t, h, d)
    return out, (q, k, v, probs, out)


def _xla_attention_backward(scale, residuals, d_out):
    """dS = P * (dP - rowsum(dOut * Out)) (Dao et al. 2022, eq. in the backward pass)."""
    q, k, v, probs, out = residuals
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qs, kvs, ss = _subscripts(h // kv_heads)
    grouped_shape = (b, t, kv_heads, h // kv_heads, d) if len(qs) == 5 else q.shape
    d_out_g = d_out.reshape(grouped_shape)
    dv = jnp.einsum(f"{ss},{qs}->{kvs}", probs.astype(d_out.dtype), d_out_g)
    d_probs = jnp.einsum(f"{qs},{kvs}->{ss}", d_out_g, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1).reshape(grouped_shape[:-1])
    row = jnp.einsum(f"{qs[:-1]}->{ss[:-1]}", row)  # to the scores' layout, without kv_len
    d_scores = (probs * (d_probs - row[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum(f"{ss},{kvs}->{qs}", d_scores, k).reshape(b, t, h, d)
    dk = jnp.einsum(f"{ss},{qs}->{kvs}", d_scores, q.reshape(grouped_shape))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_xla_attention.defvjp(_xla_attention_forward, _xla_attention_backward)


def cudnn_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """jax.nn.dot_product_attention's cuDNN path (GPU only); masks become a dense bias."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logging.info("model.attention=auto: using xla attention (%s)", reason)


def resolve_implementation(impl: str, q_shape, kv_shape, dtype) -> str:
    """Turns ``auto`` into a concrete choice: pallas where supported on GPU/TPU, else xla."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        return "xla"
    from maxlm.kernels import flash_attention_supported
    reason = flash_attention_supported(q_shape, kv_shape, dtype, backend)
    if reason:
        _log_fallback_once(reason)
        return "xla"
    return "pallas"


def _pallas_attention(q, k, v, segment_ids, *, sliding_window, scale, rules: Rules):
    """Our Pallas flash kernel, run per shard under shard_map when a mesh is set."""
    from maxlm.kernels import flash_attention

    kernel = functools.partial(flash_attention, causal=True, sliding_window=sliding_window or None,
                               scale=scale)
    mesh = sharding.partitioned_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids=segment_ids)
    qkv_spec = sharding.logical_to_spec(
        ("activation_batch", "activation_length", "activation_heads", None), rules)
    kv_spec = sharding.logical_to_spec(
        ("activation_batch", "activation_length", "activation_kv_heads", None), rules)
    seg_spec = P(qkv_spec[0], None)
    return jax.shard_map(
        lambda q, k, v, s: kernel(q, k, v, segment_ids=s), mesh=mesh,
        in_specs=(qkv_spec, kv_spec, kv_spec, seg_spec), out_specs=qkv_spec, check_vma=False,
    )(q, k, v, segment_ids)


def attention(q, k, v, *, segment_ids, positions, impl: str, sliding_window: int = 0,
              rules: Rules = sharding.DEFAULT_RULES) -> jax.Array:
    """Causal self-attention over one packed sequence batch (q, k, v share positions/segments).

    ``pallas`` masks by slot order, not by ``positions``: the same thing wherever positions step by one from
    slot to slot inside a segment (packed or padded batches). With a sliding window and a gap of padding
    inside a segment (``generate``'s uncached path over right-padded prompts) only ``xla`` windows by position.
    """
    scale = q.shape[-1] ** -0.5
    impl = resolve_implementation(impl, q.shape, k.shape, q.dtype)
    if impl == "pallas":
        return _pallas_attention(q, k, v, segment_ids, sliding_window=sliding_window,
                                 scale=scale, rules=rules)
    mask = attention_mask(segment_ids, segment_ids, positions, positions, causal=True,
                          sliding_window=sliding_window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask, scale=scale)
    return xla_attention(q, k, v, mask, scale=scale)

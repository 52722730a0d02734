"""Naive attention, the ground truth for the fused kernels.

It materialises the full score matrix and repeats K/V for grouped-query attention, so use
it only on small inputs. It computes in the dtype it is given: tests pass float64 inputs
(with ``jax_enable_x64`` on) to get an exact reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask [batch or 1, q_len, kv_len]: True where a query may attend to a key."""
    q_pos = jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    visible = jnp.ones((q_len, kv_len), dtype=bool)
    if causal:
        visible &= k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    visible = visible[None]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return visible


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention in BTNH layout with the same masking semantics as `flash_attention`.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim].
    """
    num_heads, num_kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    group = num_heads // num_kv_heads
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scale = head_dim**-0.5 if scale is None else scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = attention_mask(
        q.shape[1], k.shape[1], segment_ids=segment_ids, causal=causal, sliding_window=sliding_window
    )
    scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)

"""Dynamic loss scaling for float16 training, as pure jittable functions.

float16 gradients underflow for small values, so the loss is multiplied by a large
scale before differentiation and the gradients are divided by it afterwards. When
the scaled gradients overflow, the update is skipped and the scale halves; after
`growth_interval` finite steps in a row it doubles. The state is a small pytree that
lives in the train state (and so in checkpoints):

    grads = jax.grad(lambda p: loss_scale.scale_loss(loss_fn(p), ls))(params)
    grads, finite = loss_scale.unscale_grads(grads, ls)
    updates, opt_state = tx.update(grads, opt_state, params)  # tx = optax.apply_if_finite(...)
    ls = loss_scale.update(ls, finite)

`optax.apply_if_finite` skips the non-finite updates (or select with `finite`).
A scale stuck at its floor is a divergence signal (`DivergenceGuard(min_loss_scale=)`).
(jmp, DeepMind's library for this, has had no release since 2023, so maxlm keeps its own.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LossScaleState = dict[str, jax.Array]  # {'scale': f32[], 'good_steps': i32[]}


def init(initial: float = 2.0**15) -> LossScaleState:
    return {"scale": jnp.asarray(initial, jnp.float32), "good_steps": jnp.asarray(0, jnp.int32)}


def scale_loss(loss: jax.Array, state: LossScaleState) -> jax.Array:
    """The loss times the scale, in float32 (differentiate this one)."""
    return loss.astype(jnp.float32) * state["scale"]


def unscale_grads(grads: Any, state: LossScaleState) -> tuple[Any, jax.Array]:
    """Divides gradients by the scale (each leaf keeps its dtype); also returns whether all are finite."""
    inv = 1.0 / state["scale"]
    grads = jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)
    finite = jnp.array(True)
    for g in jax.tree.leaves(grads):
        finite = finite & jnp.all(jnp.isfinite(g))
    return grads, finite


def update(
    state: LossScaleState,
    grads_finite: jax.Array,
    *,
    growth_interval: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> LossScaleState:
    """Halves the scale (not below `min_scale`) after an overflow; grows it after a finite run."""
    good_steps = jnp.where(grads_finite, state["good_steps"] + 1, 0)
    grow = good_steps >= growth_interval
    scale = jnp.where(
        grads_finite,
        jnp.where(grow, state["scale"] * factor, state["scale"]),
        jnp.maximum(state["scale"] / factor, min_scale),
    )
    return {
        "scale": scale.astype(jnp.float32),
        "good_steps": jnp.where(grow, 0, good_steps).astype(jnp.int32),
    }

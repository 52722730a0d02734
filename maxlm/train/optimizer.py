"""AdamW with warmup + decay schedules, built from optax.

The clip threshold and a global learning-rate factor live in the optimizer
state (``optax.inject_hyperparams``), so the divergence guard can lower them
after a rollback without recompiling, and checkpoints remember the change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

EMBEDDING_PARAMS = ("embed", "pos_embed")


def lr_schedule(t) -> optax.Schedule:
    """Linear warmup to ``train.lr``, then cosine/linear decay to ``lr * min_lr_ratio`` at the last step."""
    floor = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, t.lr, t.warmup_steps), optax.constant_schedule(t.lr)], [t.warmup_steps])
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps, end_value=floor)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, t.warmup_steps),
         optax.linear_schedule(t.lr, floor, t.steps - t.warmup_steps)], [t.warmup_steps])


def decay_mask(params, decay_embeddings: bool):
    """Weight decay on weight matrices (``w*``, ``lm_head``, LoRA's ``a``/``b``) only: not norms, biases or, by
    default, embeddings."""
    def wants_decay(path, _) -> bool:
        name = getattr(path[-1], "key", "")
        return (name.startswith("w") or name in ("lm_head", "a", "b")
                or (decay_embeddings and name in EMBEDDING_PARAMS))
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(t) -> optax.GradientTransformation:
    """clip (injectable threshold) -> AdamW(schedule) -> scale (injectable lr factor)."""
    schedule = lr_schedule(t)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
        mask=lambda p: decay_mask(p, t.decay_embeddings))
    clip = optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=t.clip_norm or float("inf"))
    lr_factor = optax.inject_hyperparams(optax.scale)(step_size=1.0)
    return optax.chain(clip, adamw, lr_factor)


def current_lr(opt_state) -> jax.Array:
    """The learning rate applied by the last update (schedule value times the lr factor)."""
    _, adamw, factor = opt_state
    return adamw.hyperparams["learning_rate"] * factor.hyperparams["step_size"]


def set_rollback_scales(opt_state, *, lr_scale: float, clip_norm: float):
    """Returns opt_state with the lr factor and the clip threshold replaced (divergence rollback)."""
    clip, adamw, factor = opt_state
    clip = clip._replace(hyperparams={"max_norm": jnp.asarray(clip_norm or jnp.inf, jnp.float32)})
    factor = factor._replace(hyperparams={"step_size": jnp.asarray(lr_scale, jnp.float32)})
    return (clip, adamw, factor)

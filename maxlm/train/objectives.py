"""Training objectives as pure functions.

An objective is ``objective(params, batch, rng) -> (loss_sum, metrics)``: it
returns the *sum* of its per-token losses over the batch it is given, so that
the step can divide by the token count of the whole global batch. That makes
gradient accumulation and packing exact (per-token normalisation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maxlm.models import Model

Batch = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (for z-loss), both float32."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), jax.nn.logsumexp(logits, -1)


def next_token_objective(model: Model, z_loss: float = 0.0) -> Objective:
    """Masked next-token cross-entropy (+ optional z-loss): pretraining and SFT."""

    def objective(params, batch: Batch, rng=None):
        logits, aux = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], rng)
        ce, log_z = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"]
        ce_sum = jnp.sum(ce * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        metrics = {"loss_sum": ce_sum, "z_loss_sum": z_sum, "num_tokens": jnp.sum(mask), **aux}
        return ce_sum + z_loss * z_sum, metrics

    return objective


def make_objective(name: str, model: Model, train_cfg) -> Objective:
    if name in ("pretrain", "sft"):  # SFT differs only in its data: the loss mask covers assistant tokens
        return next_token_objective(model, train_cfg.z_loss)
    raise ValueError(f"train.objective={name!r} is not implemented")

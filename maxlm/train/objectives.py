"""Training objectives as pure functions.

An objective is ``objective(params, batch, rng, reference=None) -> (loss_sum, metrics)``. It returns
the *sum* of its per-unit losses over the batch it is given, and every metric named ``<name>_sum`` is
such a sum too; the step divides them all by :func:`loss_normalizer` of the whole global batch. That
makes gradient accumulation and packing exact. The unit is a target token for ``pretrain``/``sft``
and a preference pair for ``dpo``/``reward``, so their losses and metrics come out as per-pair means.

``reference`` is the frozen params the step passes along: the DPO reference (a separate frozen copy,
or under LoRA the base with the adapters off), or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maxlm.models import Model

Batch = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
PREFERENCE_OBJECTIVES = ("dpo", "reward")


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (for z-loss), both float32."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), jax.nn.logsumexp(logits, -1)


def loss_normalizer(batch: Batch) -> jax.Array:
    """What the step divides ``*_sum`` metrics by: target tokens, or pairs for a preference batch.

    Preference batches are ``[batch, 2, seq]`` (see ``maxlm/data/preference.py``), so their
    per-pair means need the number of pairs, not of tokens.
    """
    mask = batch["loss_mask"]
    if mask.ndim == 3:
        return jnp.asarray(mask.shape[0], jnp.float32)
    return jnp.maximum(jnp.sum(mask), 1.0)


def next_token_objective(model: Model, z_loss: float = 0.0) -> Objective:
    """Masked next-token cross-entropy (+ optional z-loss): pretraining and SFT."""

    def objective(params, batch: Batch, rng=None, reference=None):
        logits, aux = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], rng)
        ce, log_z = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"]
        ce_sum = jnp.sum(ce * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        metrics = {"loss_sum": ce_sum, "z_loss_sum": z_sum, "num_tokens": jnp.sum(mask),
                   "last_layer_act_norm": aux["last_layer_act_norm"]}
        return ce_sum + z_loss * z_sum, metrics

    return objective


def _rows(batch: Batch) -> Batch:
    """A preference batch ``[B, 2, L]`` as ``[2B, L]`` rows (chosen and rejected interleaved, no data movement)."""
    return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if v.ndim == 3}


def sequence_logps(model: Model, params, rows: Batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """Summed log-probabilities of the masked targets of each row, ``[rows]``, and the last_layer_act_norm."""
    logits, aux = model.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"], rng)
    ce, _ = token_cross_entropy(logits, rows["targets"])
    return -jnp.sum(ce * rows["loss_mask"], -1), aux["last_layer_act_norm"]


def pair_logps(model: Model, params, batch: Batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """``[B, 2]`` summed completion log-probs (chosen, rejected) from one forward pass over both."""
    logps, act_norm = sequence_logps(model, params, _rows(batch), rng)
    return logps.reshape(-1, 2), act_norm


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # conservative DPO: the preference labels flip with this probability
    reference_free: bool = False  # the reference log-probs are 0 (no reference model)


def dpo_loss(policy: jax.Array, reference: jax.Array, lengths: jax.Array, cfg: DpoConfig
             ) -> tuple[jax.Array, jax.Array]:
    """Per-pair DPO losses ``[B]`` and implicit rewards ``[B, 2]`` from ``[B, 2]`` (chosen, rejected) log-probs.

    With ``h`` the reference-adjusted log-ratio margin
    ``(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:
      sigmoid  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` (DPO; eps > 0: conservative DPO)
      hinge    ``max(0, 1 - beta h)`` (SLiC)
      ipo      ``(h - 1 / (2 beta))^2`` with log-probs averaged over the completion's tokens (IPO)
    The implicit rewards are ``beta (log pi - log ref)`` of the log-probs the loss used.
    """
    if cfg.loss == "ipo":
        policy, reference = policy / lengths, reference / lengths
    ratios = policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    if cfg.loss == "sigmoid":
        eps = cfg.label_smoothing
        losses = -(1 - eps) * jax.nn.log_sigmoid(cfg.beta * h) - eps * jax.nn.log_sigmoid(-cfg.beta * h)
    elif cfg.loss == "hinge":
        losses = jax.nn.relu(1 - cfg.beta * h)
    elif cfg.loss == "ipo":
        losses = jnp.square(h - 1 / (2 * cfg.beta))
    else:
        raise ValueError(f"train.dpo.loss={cfg.loss!r} is not one of {', '.join(DPO_LOSSES)}")
    return losses, cfg.beta * ratios


def pair_metrics(losses: jax.Array, rewards: jax.Array) -> dict[str, jax.Array]:
    """Sums over pairs (the step makes them means): loss, rewards/{chosen,rejected,accuracies,margins}."""
    margins = rewards[:, 0] - rewards[:, 1]
    return {"loss_sum": jnp.sum(losses), "rewards/chosen_sum": jnp.sum(rewards[:, 0]),
            "rewards/rejected_sum": jnp.sum(rewards[:, 1]),
            "rewards/accuracies_sum": jnp.sum((margins > 0).astype(jnp.float32)),
            "rewards/margins_sum": jnp.sum(margins), "num_tokens": jnp.asarray(losses.shape[0], jnp.float32)}


def dpo_objective(model: Model, cfg: DpoConfig) -> Objective:
    """DPO on preference batches. Reference log-probs: 0 (reference-free), the batch's precomputed
    ``ref_logps``, or a forward pass of the ``reference`` params (no gradient)."""

    def objective(params, batch: Batch, rng=None, reference=None):
        policy, act_norm = pair_logps(model, params, batch, rng)
        if cfg.reference_free:
            ref = jnp.zeros_like(policy)
        elif "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif reference is not None:
            ref = jax.lax.stop_gradient(pair_logps(model, reference, batch)[0])
        else:
            raise ValueError("DPO needs reference params, precomputed ref_logps, or reference_free=True")
        lengths = jnp.maximum(jnp.sum(batch["loss_mask"], -1), 1.0)
        losses, rewards = dpo_loss(policy, ref, lengths, cfg)
        metrics = pair_metrics(losses, rewards)
        metrics.update({"logps/chosen_sum": jnp.sum(policy[:, 0]), "logps/rejected_sum": jnp.sum(policy[:, 1]),
                        "last_layer_act_norm": act_norm})
        return metrics["loss_sum"], metrics

    return objective


def last_token_values(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``values[row, last non-pad position]`` of ``[rows, len]`` arrays (rows are padded at the end)."""
    last = jnp.maximum(jnp.sum(segment_ids > 0, -1) - 1, 0)
    return jnp.take_along_axis(values, last[:, None], -1)[:, 0]


def reward_objective(model: Model) -> Objective:
    """Bradley-Terry reward model: ``-log sigmoid(r(chosen) - r(rejected))``, ``r`` the value head's
    output at the last non-pad token (``model.value_head=True``)."""

    def objective(params, batch: Batch, rng=None, reference=None):
        rows = _rows(batch)
        _, aux = model.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"], rng)
        rewards = last_token_values(aux["values"], rows["segment_ids"]).reshape(-1, 2)
        losses = -jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1])
        metrics = dict(pair_metrics(losses, rewards), last_layer_act_norm=aux["last_layer_act_norm"])
        return metrics["loss_sum"], metrics

    return objective


def make_objective(name: str, model: Model, train_cfg) -> Objective:
    if name in ("pretrain", "sft"):  # SFT differs only in its data: the loss mask covers assistant tokens
        return next_token_objective(model, train_cfg.z_loss)
    if name == "dpo":
        d = train_cfg.dpo
        return dpo_objective(model, DpoConfig(d.beta, d.loss, d.label_smoothing, d.reference_free))
    if name == "reward":
        return reward_objective(model)
    raise ValueError(f"train.objective={name!r} is not implemented")

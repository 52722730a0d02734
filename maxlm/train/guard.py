"""Divergence guard: watches loss, grad norm and fp16 loss scale, and says when to roll back.

Pure Python: the training loop feeds it host floats once per step and performs the
rollback itself (restore the last good checkpoint, skip the data window, scale lr and
clip by `lr_scale` / `clip_scale`). Config: `train.divergence.*`; the field names here
are the config keys, so `DivergenceGuard(**keys_except_enabled)` builds one.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

# A process that gives up after `max_rollbacks` exits with this code; the
# supervisor does not restart it (a restart would diverge again).
DIVERGED_EXIT_CODE = 43

# The loss std used for spike detection is at least this fraction of the mean, so a
# flat plateau (std near 0) does not turn noise into "spikes".
_MIN_RELATIVE_STD = 0.01


class DivergenceError(RuntimeError):
    """Training diverged more often than `max_rollbacks` allows."""


@dataclasses.dataclass
class DivergenceGuard:
    """Detects divergence from per-step scalars.

    Signals, checked in this order by `observe`:
    - loss-scale collapse: the fp16 loss scale is at or below `min_loss_scale` (keep
      it >= the scaler's floor, `loss_scale.update(min_scale=...)`);
    - non-finite loss or grad norm (without loss scaling; with it, an overflowing step
      is the loss scaler's business: it is skipped and counts as neither healthy nor bad);
    - grad-norm blow-up: grad norm > `grad_norm_factor` x the rolling mean grad norm;
    - loss spike: loss > rolling mean + `spike_sigma` x rolling std (at least 1% of the
      mean, so a flat plateau does not make noise a spike) for
      `spike_patience` consecutive steps.
    Rolling stats cover the last `window` healthy steps; the last two checks start
    once half a window has been seen.

    `rollbacks` counts rollbacks done so far (pass the count from events.jsonl when a
    run restarts); the lr and clip threshold multipliers follow from it.
    """

    window: int = 50
    spike_sigma: float = 6.0
    spike_patience: int = 3
    grad_norm_factor: float = 10.0
    min_loss_scale: float = 1.0
    lr_factor: float = 0.5
    clip_factor: float = 1.0
    max_rollbacks: int = 3
    rollbacks: int = 0

    def __post_init__(self):
        if self.window < 2 or self.spike_patience < 1:
            raise ValueError(
                f"train.divergence needs window >= 2 and spike_patience >= 1, got "
                f"window={self.window}, spike_patience={self.spike_patience}"
            )
        self._losses: collections.deque[float] = collections.deque(maxlen=self.window)
        self._grad_norms: collections.deque[float] = collections.deque(maxlen=self.window)
        self._spike_streak = 0

    @property
    def lr_scale(self) -> float:
        """Multiply the learning rate by this (`lr_factor ** rollbacks`)."""
        return self.lr_factor**self.rollbacks

    @property
    def clip_scale(self) -> float:
        """Multiply the gradient clipping threshold by this (`clip_factor ** rollbacks`)."""
        return self.clip_factor**self.rollbacks

    @property
    def suspect(self) -> bool:
        """True while a loss spike is under way but not yet confirmed: do not checkpoint now."""
        return self._spike_streak > 0

    def observe(
        self, step: int, loss: float, grad_norm: float, loss_scale: float | None = None
    ) -> str | None:
        """Returns None if step `step` looks healthy, else a one-line reason to roll back."""
        loss, grad_norm = float(loss), float(grad_norm)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if loss_scale is not None and float(loss_scale) <= self.min_loss_scale:
            return f"step {step}: fp16 loss scale collapsed to {float(loss_scale):g} (<= {self.min_loss_scale:g})"
        if not finite:
            if loss_scale is not None:
                return None  # Overflow: the loss scaler skips this update and lowers the scale.
            what = "loss" if not math.isfinite(loss) else "grad norm"
            return f"step {step}: non-finite {what} (loss={loss}, grad_norm={grad_norm})"

        if len(self._losses) >= max(2, self.window // 2):
            mean_norm = float(np.mean(self._grad_norms))
            if grad_norm > self.grad_norm_factor * mean_norm:
                return (
                    f"step {step}: grad norm {grad_norm:.4g} > {self.grad_norm_factor:g} x "
                    f"rolling mean {mean_norm:.4g}"
                )
            mean, std = float(np.mean(self._losses)), float(np.std(self._losses))
            threshold = mean + self.spike_sigma * max(std, _MIN_RELATIVE_STD * abs(mean))
            if loss > threshold:
                self._spike_streak += 1
                if self._spike_streak >= self.spike_patience:
                    return (
                        f"step {step}: loss {loss:.4g} above {threshold:.4g} (rolling mean {mean:.4g} "
                        f"+ {self.spike_sigma:g} sigma) for {self._spike_streak} consecutive steps"
                    )
                return None
        self._spike_streak = 0
        self._losses.append(loss)
        self._grad_norms.append(grad_norm)
        return None

    def reset_after_rollback(self) -> None:
        """Counts a rollback (raising `DivergenceError` past `max_rollbacks`) and clears the streak.

        The rolling stats are kept: they describe the healthy run before the rollback.
        """
        if self.rollbacks >= self.max_rollbacks:
            raise DivergenceError(
                f"training diverged again after {self.rollbacks} rollbacks "
                f"(train.divergence.max_rollbacks={self.max_rollbacks}); giving up"
            )
        self.rollbacks += 1
        self._spike_streak = 0

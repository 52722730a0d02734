"""Tests for maxlm.train.guard.DivergenceGuard."""

import math

import numpy as np
import pytest

from maxlm.train.guard import DivergenceError, DivergenceGuard


def _warm(guard: DivergenceGuard, steps: int = 20, seed: int = 0) -> int:
    """Feeds healthy, slowly falling, noisy losses; returns the next step number."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        assert (
            guard.observe(step, 3.0 - 0.01 * step + 0.02 * rng.standard_normal(), 1.0 + 0.1 * rng.random())
            is None
        )
    return steps


def test_healthy_run_never_triggers():
    guard = DivergenceGuard(window=20)
    _warm(guard, steps=500)
    assert not guard.suspect


@pytest.mark.parametrize(
    "loss,grad_norm,what",
    [
        (math.nan, 1.0, "non-finite loss"),
        (math.inf, 1.0, "non-finite loss"),
        (2.0, math.nan, "non-finite grad norm"),
    ],
)
def test_non_finite_triggers_at_once(loss, grad_norm, what):
    guard = DivergenceGuard(window=20)
    assert what in guard.observe(0, loss, grad_norm)  # even before any history


def test_spike_needs_patience_consecutive_steps():
    guard = DivergenceGuard(window=20, spike_sigma=6.0, spike_patience=3)
    step = _warm(guard)
    assert guard.observe(step, 10.0, 1.0) is None and guard.suspect
    assert guard.observe(step + 1, 10.0, 1.0) is None
    reason = guard.observe(step + 2, 10.0, 1.0)
    assert "loss 10 above" in reason and "3 consecutive steps" in reason


def test_an_isolated_spike_is_forgiven():
    guard = DivergenceGuard(window=20, spike_patience=2)
    step = _warm(guard)
    assert guard.observe(step, 10.0, 1.0) is None
    assert guard.observe(step + 1, 2.8, 1.0) is None and not guard.suspect
    assert guard.observe(step + 2, 10.0, 1.0) is None  # the streak restarted


def test_grad_norm_blow_up():
    guard = DivergenceGuard(window=20, grad_norm_factor=10.0)
    step = _warm(guard)
    assert guard.observe(step, 2.8, 5.0) is None
    assert "grad norm 50 > 10 x rolling mean" in guard.observe(step + 1, 2.8, 50.0)


def test_loss_scale_collapse_and_fp16_overflow_steps():
    guard = DivergenceGuard(window=20, min_loss_scale=1.0)
    step = _warm(guard)
    # With loss scaling an overflowing step is skipped by the scaler, not a divergence.
    assert guard.observe(step, 2.8, math.inf, loss_scale=1024.0) is None
    assert "loss scale collapsed to 0.5" in guard.observe(step + 1, 2.8, 1.0, loss_scale=0.5)


def test_rollbacks_scale_lr_and_clip_then_give_up():
    guard = DivergenceGuard(window=20, lr_factor=0.5, clip_factor=0.3, max_rollbacks=2)
    step = _warm(guard)
    assert guard.observe(step, math.nan, 1.0)
    guard.reset_after_rollback()
    assert (guard.rollbacks, guard.lr_scale, guard.clip_scale) == (1, 0.5, 0.3)
    guard.reset_after_rollback()
    assert guard.lr_scale == 0.25 and guard.clip_scale == pytest.approx(0.09)
    with pytest.raises(DivergenceError, match="after 2 rollbacks"):
        guard.reset_after_rollback()
    # A restarted run resumes the count (and so the scales) from events.jsonl.
    assert DivergenceGuard(lr_factor=0.5, rollbacks=2).lr_scale == 0.25


def test_rollback_clears_the_spike_streak():
    guard = DivergenceGuard(window=20, spike_patience=2)
    step = _warm(guard)
    guard.observe(step, 10.0, 1.0)
    guard.reset_after_rollback()
    assert not guard.suspect
    assert guard.observe(step, 10.0, 1.0) is None  # one spike step again, not two

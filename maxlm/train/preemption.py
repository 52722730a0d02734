"""Preemption: turn SIGTERM into "save at the next step boundary, then exit cleanly".

The signal handler only sets a flag; the training loop polls `should_stop(step)` once
per step, saves with `force=True`, waits for the save and exits with
`PREEMPTED_EXIT_CODE`, which the supervisor reads as "stopped on purpose".
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Callable, Sequence

import jax
from absl import logging

# Exit status of a training process that saved and stopped after SIGTERM/SIGINT.
# Distinct from 0 (finished), 1 (crash) and 128+N (killed by signal N).
PREEMPTED_EXIT_CODE = 42


class PreemptionWatcher:
    """Installs signal handlers that record a stop request; restores the old ones on close.

    Single-process runs act on the signal directly. Multi-process runs must stop at
    the same step on every host, so they rely on JAX's preemption sync point (via
    `reached_preemption`, e.g. `Checkpointer.reached_preemption`) and install no
    handler (JAX's preemption service handles SIGTERM there). A second signal while a
    stop is pending runs the previous handler (e.g. Ctrl-C twice interrupts at once).
    """

    def __init__(
        self,
        reached_preemption: Callable[[int], bool] | None = None,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ):
        self._reached_preemption = reached_preemption
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        if jax.process_count() == 1:
            for sig in signals:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = signal.SIG_DFL if previous is None else previous

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            previous = self._previous.get(sig, signal.SIG_DFL)
            self.close()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(sig)
            return
        self.received = sig
        logging.warning("Received %s: will save and stop at the next step boundary.", sig.name)

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested (or all hosts reached the preemption sync point)."""
        if self.received is not None:
            return True
        if jax.process_count() > 1 and self._reached_preemption is not None:
            return self._reached_preemption(step)
        return False

    def close(self) -> None:
        """Puts back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

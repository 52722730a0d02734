"""Supervisor: rerun a training command after crashes, with capped restarts and back-off.

The training process resumes from its latest checkpoint by itself, so restarting
it is all the supervisor has to do. Every start, exit, restart and the final
decision go to WORKDIR/events.jsonl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Sequence

from maxlm.train.events import log_event
from maxlm.train.guard import DIVERGED_EXIT_CODE
from maxlm.train.preemption import PREEMPTED_EXIT_CODE


def supervise(
    command: Sequence[str],
    workdir: str | os.PathLike,
    *,
    max_restarts: int = 10,
    backoff_s: float = 5.0,
    max_backoff_s: float = 300.0,
    restart_on_preemption: bool = False,
) -> int:
    """Runs `command` until it exits 0, restarting it at most `max_restarts` times.

    Waits `backoff_s * 2**k` seconds (capped at `max_backoff_s`) before restart k+1.
    Does not restart after `PREEMPTED_EXIT_CODE` (unless `restart_on_preemption`),
    after `DIVERGED_EXIT_CODE`, or once the supervisor itself got SIGTERM, which it
    forwards to the child. Returns an exit status for the supervisor: the child's
    last one, or 128+N if the child was killed by signal N. Call from the main thread.
    """
    command = list(command)
    stop = threading.Event()
    child: subprocess.Popen | None = None

    def forward_sigterm(signum: int, frame) -> None:
        del frame
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous_handler = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        attempt = 0
        while True:
            child = subprocess.Popen(command)
            log_event(workdir, "supervisor_start", attempt=attempt, pid=child.pid, command=command)
            returncode = child.wait()
            killed_by = signal.Signals(-returncode).name if returncode < 0 else None
            log_event(workdir, "supervisor_exit", attempt=attempt, returncode=returncode, signal=killed_by)
            status = 128 - returncode if returncode < 0 else returncode

            if returncode == 0:
                log_event(workdir, "supervisor_done", attempts=attempt + 1)
                return 0
            reason = _reason_to_stop(returncode, stop.is_set(), restart_on_preemption)
            if reason is not None:
                log_event(workdir, "supervisor_stop", reason=reason, returncode=returncode)
                return status
            if attempt >= max_restarts:
                log_event(workdir, "supervisor_give_up", restarts=max_restarts, returncode=returncode)
                return status

            delay = min(backoff_s * 2**attempt, max_backoff_s)
            log_event(
                workdir, "supervisor_restart", attempt=attempt + 1, backoff_s=delay, returncode=returncode
            )
            if stop.wait(delay):
                log_event(workdir, "supervisor_stop", reason="SIGTERM during back-off", returncode=returncode)
                return status
            attempt += 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)


def _reason_to_stop(returncode: int, got_sigterm: bool, restart_on_preemption: bool) -> str | None:
    if got_sigterm:
        return "supervisor got SIGTERM"
    if returncode == PREEMPTED_EXIT_CODE and not restart_on_preemption:
        return "child was preempted (saved and stopped)"
    if returncode == DIVERGED_EXIT_CODE:
        return "child gave up on divergence"
    return None

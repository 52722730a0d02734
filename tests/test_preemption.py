"""Tests for maxlm.train.preemption.PreemptionWatcher."""

import os
import signal

from maxlm.train.preemption import PreemptionWatcher


def test_sigterm_sets_the_flag_and_close_restores_the_handler():
    def previous(signum, frame):
        del signum, frame

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionWatcher(signals=(signal.SIGTERM,)) as watcher:
            assert not watcher.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
            assert watcher.should_stop(1) and watcher.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_second_signal_runs_the_previous_handler():
    calls = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        watcher = PreemptionWatcher(signals=(signal.SIGTERM,))
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == []
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the user insists
        assert calls == [signal.SIGTERM]
        watcher.close()
    finally:
        signal.signal(signal.SIGTERM, old)

"""Tests for maxlm.train.supervisor and launch/supervise.py, with tiny child scripts."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from maxlm.train.events import read_events
from maxlm.train.preemption import PREEMPTED_EXIT_CODE
from maxlm.train.supervisor import supervise

REPO = Path(__file__).resolve().parents[1]

# Fails (in the way given by argv[2]) the first argv[3] times, then succeeds.
# The attempt count is kept in the file argv[1].
FLAKY = """
import os, signal, sys
counter, how, failures = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, 'w').write(str(n + 1))
if n < failures:
    if how == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(how))
"""

# A "training loop" that stops cleanly on SIGTERM, like launch/train.py does.
TRAINER = """
import sys, time
from pathlib import Path
from maxlm.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher
watcher = PreemptionWatcher()
Path(sys.argv[1]).write_text('ready')
for step in range(100000):
    if watcher.should_stop(step):
        Path(sys.argv[1]).write_text(f'saved at {step}')
        sys.exit(PREEMPTED_EXIT_CODE)
    time.sleep(0.01)
"""


def _events(workdir):
    return [e["event"] for e in read_events(workdir)]


def _flaky(tmp_path, how, failures):
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    return [sys.executable, str(script), str(tmp_path / "count"), how, str(failures)]


def test_restarts_until_success(tmp_path):
    assert supervise(_flaky(tmp_path, "3", 2), tmp_path, backoff_s=0.01) == 0
    assert _events(tmp_path) == ["supervisor_start", "supervisor_exit", "supervisor_restart"] * 2 + [
        "supervisor_start",
        "supervisor_exit",
        "supervisor_done",
    ]
    assert [e["returncode"] for e in read_events(tmp_path) if e["event"] == "supervisor_exit"] == [3, 3, 0]


def test_gives_up_after_max_restarts_with_capped_backoff(tmp_path):
    status = supervise(
        _flaky(tmp_path, "3", 99), tmp_path, max_restarts=3, backoff_s=0.01, max_backoff_s=0.03
    )
    assert status == 3
    events = read_events(tmp_path)
    assert [e["backoff_s"] for e in events if e["event"] == "supervisor_restart"] == [0.01, 0.02, 0.03]
    assert _events(tmp_path).count("supervisor_start") == 4
    assert events[-1]["event"] == "supervisor_give_up"


def test_sigkilled_child_is_restarted(tmp_path):
    assert supervise(_flaky(tmp_path, "kill", 1), tmp_path, backoff_s=0.01) == 0
    exits = [e for e in read_events(tmp_path) if e["event"] == "supervisor_exit"]
    assert [(e["returncode"], e["signal"]) for e in exits] == [(-9, "SIGKILL"), (0, None)]


def test_preempted_child_is_not_restarted_unless_asked(tmp_path):
    command = _flaky(tmp_path, str(PREEMPTED_EXIT_CODE), 1)
    assert supervise(command, tmp_path, backoff_s=0.01) == PREEMPTED_EXIT_CODE
    assert _events(tmp_path)[-1] == "supervisor_stop"
    assert supervise(command, tmp_path / "again", backoff_s=0.01, restart_on_preemption=True) == 0


def test_sigterm_is_forwarded_and_the_child_stops_cleanly(tmp_path):
    script, marker = tmp_path / "trainer.py", tmp_path / "marker"
    script.write_text(TRAINER)
    supervisor = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "supervise.py"),
            f"--workdir={tmp_path}",
            "--backoff_s=0.01",
            "--",
            sys.executable,
            str(script),
            str(marker),
        ],
        cwd=REPO,
    )
    deadline = time.time() + 60
    while not (marker.exists() and marker.read_text() == "ready"):
        assert time.time() < deadline and supervisor.poll() is None, "child never started"
        time.sleep(0.05)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == PREEMPTED_EXIT_CODE
    assert marker.read_text().startswith("saved at")
    stop = read_events(tmp_path)[-1]
    assert stop["event"] == "supervisor_stop" and stop["returncode"] == PREEMPTED_EXIT_CODE

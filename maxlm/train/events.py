"""An append-only event log: `WORKDIR/events.jsonl`, one JSON object per line.

Every fault-tolerance action (save, restore, quarantine, rollback, restart,
preemption) is written here so that a run can be audited after the fact.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
from absl import logging

EVENTS_FILE = "events.jsonl"


def log_event(workdir: str | os.PathLike, event: str, **fields: Any) -> dict[str, Any]:
    """Appends `{'time', 'event', **fields}` to WORKDIR/events.jsonl (fsynced) and logs it; in a
    multi-process run only process 0 writes. It never starts a JAX backend itself (the supervisor, a
    parent of the training processes, must not claim the accelerators)."""
    record = {"time": time.time(), "event": event, **fields}
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        return record
    line = json.dumps(record, default=str)
    path = Path(workdir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    logging.info("event %s", line)
    return record


def read_events(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns all events of WORKDIR/events.jsonl in order ([] if there is none).

    A torn last line (the process died while writing it) is skipped.
    """
    path = Path(workdir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events

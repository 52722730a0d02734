"""Checkpointing: an Orbax CheckpointManager with save/keep policies, resume and fallback.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`.
- `state`: the train state pytree (params, opt_state, step, rng, ...), one array store.
- `data`: the grain iterator state, one JSON file per process (optional).
- `config`: the resolved config as JSON, for humans and tools (optional).

Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete,
so a half-written step is never listed. A listed step that still fails to read
(truncated or deleted files) is moved to `WORKDIR/quarantine/<step>-<time>` once an
older step has restored instead. A checkpoint whose shapes differ from what the
config asks for is a user error, not corruption: `CheckpointMismatchError`, kept.
Nothing here unpickles: Orbax stores arrays with TensorStore and metadata as JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from maxlm import sharding
from maxlm.train.events import log_event

PyTree = Any


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not match the shapes the current config asks for."""


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist, but none of them could be restored."""


class Checkpointer:
    """Saves and restores the train state, data iterator and config of one workdir.

    Saves happen when `save()` is called at a step that is a multiple of
    `every_steps`, or at least `every_minutes` after the previous save (a fresh
    run also saves its first step then), or when `force=True`. The latest
    `keep_last` steps are kept, plus every step divisible by `keep_every`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
    ):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        _write_replicated_arrays_from_one_device()
        self.workdir = Path(workdir).absolute()  # Orbax needs absolute paths
        self.directory = self.workdir / "checkpoints"
        save_policies: list[Any] = [policies.PreemptionCheckpointingPolicy()]
        if every_steps > 0:
            save_policies.append(policies.FixedIntervalPolicy(every_steps))
        if every_minutes > 0:
            save_policies.append(
                policies.ContinuousCheckpointingPolicy(
                    minimum_interval_secs=max(1, round(every_minutes * 60))
                )
            )
        keep_policies: list[Any] = [policies.LatestN(keep_last)]
        if keep_every > 0:
            keep_policies.append(policies.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        self._decision: tuple[int, bool] | None = None  # (step, whether the policies save it); see will_save

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True at the step where all hosts agreed to stop (multi-host runs only)."""
        return self._mgr.reached_preemption(step)

    def will_save(self, step: int, force: bool = False) -> bool:
        """Whether ``save(step, ..., force=force)`` will save: the step is new and a policy (or ``force``) says so.

        The policies' answer for a step is decided once and kept: the time-based one reads the clock, and the
        training loop checks a step's health exactly when it is about to be saved, so both must agree.
        """
        if step in self._mgr.all_steps():
            return False
        if force:
            return True
        if self._decision is None or self._decision[0] != step:
            self._decision = (step, self._mgr.should_save(step))
        return self._decision[1]

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_iterator: Any = None,
        config_json: str | None = None,
        force: bool = False,
    ) -> bool:
        """Saves if the policies (or `force`) say so; returns whether a save started.

        With async saving this returns once the arrays are copied off the devices
        and the files are written in the background; the iterator state is read
        before it returns, so the caller may advance the iterator (and donate `state`).
        """
        if not self.will_save(step, force):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config_json))
        saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)  # decided by will_save
        if saved:
            self._event("checkpoint_save", step=step, forced=force)
        return saved

    def restore(
        self, abstract_state: PyTree, *, data_iterator: Any = None, step: int | None = None
    ) -> tuple[PyTree, int] | None:
        """Restores the latest readable step (at most `step`) onto `abstract_state`'s shardings.

        `abstract_state` has the train state's structure with `jax.ShapeDtypeStruct`
        leaves carrying the target `NamedSharding`s, so a checkpoint saved on one mesh
        restores onto another. `data_iterator`, if given, is set to the saved position.
        Returns `(state, step)`, or None if there are no checkpoints.

        A step that fails to read is skipped for the one before it; once an older step
        restores, the failed ones are quarantined. If none restores, nothing is moved
        (the cause may be on our side, not the files) and `CheckpointRestoreError` says why.
        """
        self._mgr.wait_until_finished()
        self._mgr.reload()
        candidates = [s for s in self.all_steps() if step is None or s <= step]
        failed: list[tuple[int, Exception]] = []
        for s in reversed(candidates):
            try:
                state = self._restore_step(s, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                if "RESOURCE_EXHAUSTED" in str(e):
                    raise  # Out of memory says nothing about the checkpoint.
                logging.warning("Checkpoint step %d failed to restore, trying the previous one: %s", s, e)
                failed.append((s, e))
                continue
            for bad_step, error in failed:
                self._quarantine(bad_step, error)
            self._event("checkpoint_restore", step=s)
            return state, s
        if failed:
            bad_step, error = failed[0]
            raise CheckpointRestoreError(
                f"none of the {len(failed)} checkpoints in {self.directory} could be restored; "
                f"the latest (step {bad_step}) failed with {type(error).__name__}: {error}"
            ) from error
        return None

    def _restore_step(self, step: int, abstract_state: PyTree, data_iterator: Any) -> PyTree:
        metadata = self._mgr.item_metadata(step)
        if metadata["state"] is None:
            raise ValueError("the state item has no readable metadata")
        where = self.directory / str(step)
        check_shapes(metadata["state"].tree, abstract_state, where=where)
        if data_iterator is not None and "data" not in metadata:
            raise CheckpointMismatchError(
                f"checkpoint {where} has no data iterator state, but a data iterator was given"
            )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        saved_processes = _saved_process_count(where / "data")
        if data_iterator is not None and saved_processes not in (None, jax.process_count()):
            logging.warning("checkpoint %s was saved by %d processes and this run has %d: the data iterators start "
                            "afresh, so the data order differs from an uninterrupted run", where, saved_processes,
                            jax.process_count())
            self._event("data_order_changed", step=step, saved_processes=saved_processes,
                        processes=jax.process_count())
        elif data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._mgr.restore(step, args=ocp.args.Composite(**items))["state"]

    def read_config(self, step: int) -> dict[str, Any] | None:
        """The config JSON saved with `step`, or None if it was saved without one."""
        if "config" not in self._mgr.item_metadata(step):
            return None
        restored = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def wait(self) -> None:
        """Blocks until the in-flight async save (if any) is on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def _quarantine(self, step: int, error: Exception) -> None:
        """Moves an unreadable step out of the manager's sight, with a warning and an event."""
        dest = self.workdir / "quarantine" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.directory / str(step), dest)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"maxlm_quarantine_{step}")
        self._mgr.reload()
        message = f"{type(error).__name__}: {error}"[:1000]
        logging.warning("Checkpoint step %d failed to restore and was moved to %s: %s", step, dest, message)
        self._event("checkpoint_quarantined", step=step, path=str(dest), error=message)

    def _event(self, event: str, **fields: Any) -> None:
        if jax.process_index() == 0:
            log_event(self.workdir, event, **fields)


def load_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """Restores only the params of a checkpoint (for `init_from`) onto the given shardings.

    `path` is a workdir, its `checkpoints` dir (the latest step is used) or one
    `checkpoints/<step>` dir. `abstract_params` is the params pytree with
    `jax.ShapeDtypeStruct` leaves carrying the target shardings.
    """
    state_dir = epath.Path(_find_step_dir(Path(path).absolute()) / "state")
    target = {"params": abstract_params}
    handler = ocp.PyTreeCheckpointHandler()
    try:
        check_shapes(handler.metadata(state_dir).tree, target, where=state_dir, only_prefix="params")
        restored = handler.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    finally:
        handler.close()
    return restored["params"]


def read_state(workdir: str | os.PathLike, step: int | None = None) -> PyTree:
    """The whole saved train state of ``step`` (default: the latest) as numpy arrays: for inspection and tests."""
    root = Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {root}")
    state_dir = root / str(steps[-1] if step is None else step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        target = sharding.on_device(handler.metadata(state_dir).tree)
        state = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    finally:
        handler.close()
    return jax.tree.map(np.asarray, state)


def check_shapes(
    saved_tree: PyTree, abstract_tree: PyTree, *, where: Any, only_prefix: str | None = None
) -> None:
    """Raises `CheckpointMismatchError` naming every path whose shape or presence differs.

    `saved_tree` is Orbax metadata (leaves have `.shape`); `only_prefix` limits the
    comparison to one top-level subtree (e.g. 'params').
    """
    saved = _shapes_by_path(saved_tree)
    wanted = _shapes_by_path(abstract_tree)
    if only_prefix is not None:
        saved = {k: v for k, v in saved.items() if k.split(".")[0] == only_prefix}
    problems = [
        f"{k}: checkpoint has shape {saved[k]}, config expects {wanted[k]}"
        for k in sorted(saved.keys() & wanted.keys())
        if saved[k] != wanted[k]
    ]
    problems += [
        f"{k}: config expects shape {wanted[k]}, missing in the checkpoint"
        for k in sorted(wanted.keys() - saved.keys())
    ]
    problems += [
        f"{k}: in the checkpoint (shape {saved[k]}), not in the config"
        for k in sorted(saved.keys() - wanted.keys())
    ]
    problems.sort(key=lambda line: not line.startswith("params."))  # the params are what users recognise
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the current config "
            f"({len(problems)} mismatched arrays):\n  " + "\n  ".join(shown)
        )


def _shapes_by_path(tree: PyTree) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _find_step_dir(path: Path) -> Path:
    if path.name.isdigit() and (path / "state").is_dir():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = [int(p.name) for p in path.glob("*") if p.name.isdigit() and (p / "state").is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint found at {path}: expected a workdir, its checkpoints/ dir "
            "or a checkpoints/<step> dir"
        )
    return path / str(max(steps))


def _write_replicated_arrays_from_one_device() -> None:
    """In a single-process run, Orbax writes each replicated array from one device.

    Its default, replica-parallel writing (each replica writes a slice: several hosts share the work
    of a data-parallel state) gains nothing inside one process and jit-compiles a slice per array
    shape: ~0.7 s of compiling before a small model's first save. The handler keeps no array
    metadata store, which Orbax only needs for typed PRNG keys; the train state holds raw key data.
    """
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _item_handlers() -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def _saved_process_count(data_dir: Path) -> int | None:
    """How many processes saved the data iterator states in ``data_dir`` (grain writes
    ``process_I-of-N.json`` per process), or None if there are none."""
    for path in data_dir.glob("process_*-of-*.json"):
        return int(path.stem.rsplit("-of-", 1)[1])
    return None

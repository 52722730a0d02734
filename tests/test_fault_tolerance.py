"""End-to-end fault tolerance (issue 4): exact resume, resharding, SIGTERM, corruption, NaN, mismatch, init_from.

Every run is `launch/train.py` in a subprocess (a real process to kill, a real exit
status, its own fake-device count), on `tiny_config()` for 10 steps with a checkpoint
every 2 steps on an 8-device (data=2, fsdp=4) mesh unless a test says otherwise. All
runs share JAX's persistent compilation cache and the tokenizer cache, so a run costs
a few seconds after the first one of each shape.

Interrupted runs stop at a chosen step deterministically: `PAUSER` (below) wraps
`launch/train.py` and, when the loop calls `Checkpointer.save` for that step, writes a
marker file and waits. The test then sends the real signal (SIGKILL or SIGTERM) from
outside. Nothing else in the process is changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from maxlm.checkpoint import load_params, read_state
from maxlm.train.events import read_events
from maxlm.train.guard import DIVERGED_EXIT_CODE
from maxlm.train.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS, EVERY = 10, 2
RUN_TIMEOUT_S = 300

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

def get_config():
    c = tiny_config()
    c.train.update(steps={steps}, log_every=1, eval_every=0, eval_batches=1)
    c.mesh.update(data=2, fsdp=4, tensor=1)
    c.checkpoint.update(every_steps={every}, keep_last=3)
    c.data.cache_dir = {cache!r}
    return c
"""

# launch/train.py, paused inside the loop's `Checkpointer.save` call for step
# $FT_PAUSE_AT (after the save started, before the preemption check of that step):
# writes the step to $FT_MARKER, then waits until $FT_MARKER.go exists.
PAUSER = """
import os, runpy, sys, time
from maxlm import checkpoint

pause_at, marker = int(os.environ['FT_PAUSE_AT']), os.environ['FT_MARKER']
original = checkpoint.Checkpointer.save
paused = []

def save(self, step, *args, **kwargs):
    started = original(self, step, *args, **kwargs)
    if step == pause_at and not paused:
        paused.append(step)
        with open(marker + '.tmp', 'w') as f:
            f.write(str(step))
        os.replace(marker + '.tmp', marker)
        deadline = time.time() + 300
        while not os.path.exists(marker + '.go') and time.time() < deadline:
            time.sleep(0.01)
    return started

checkpoint.Checkpointer.save = save
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files shared by the module's runs: the config, the pauser, the caches."""
    root = tmp_path_factory.mktemp("ft")
    config = root / "config.py"
    config.write_text(CONFIG.format(tests=str(TESTS), steps=STEPS, every=EVERY, cache=str(root / "cache")))
    pauser = root / "pauser.py"
    pauser.write_text(PAUSER.format(train=str(REPO / "launch" / "train.py")))
    return {"root": root, "config": config, "pauser": pauser, "jit_cache": root / "jit_cache"}


def _command(env, workdir, *overrides, pause=False):
    script = env["pauser"] if pause else REPO / "launch" / "train.py"
    return [
        sys.executable,
        str(script),
        f"--config={env['config']}",
        f"--workdir={workdir}",
        *(f"--config.{o}" for o in overrides),
    ]


def _env(env, devices=8, **extra):
    e = dict(os.environ)
    e.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(env["jit_cache"]),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return e


def _run(env, workdir, *overrides, devices=8):
    """Runs launch/train.py to its end; returns the CompletedProcess (stderr captured)."""
    return subprocess.run(
        _command(env, workdir, *overrides),
        env=_env(env, devices),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _run_ok(env, workdir, *overrides, devices=8):
    proc = _run(env, workdir, *overrides, devices=devices)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _interrupt(env, workdir, at_step, sig, *overrides):
    """Starts a run, waits until it is paused at `at_step`, sends `sig`, lets it go on.

    Returns the exit status and stderr (which goes to a file: a pipe nobody reads while
    waiting could fill up and stall the run).
    """
    marker = Path(workdir).parent / f"{Path(workdir).name}.marker"
    log = Path(workdir).parent / f"{Path(workdir).name}.stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            _command(env, workdir, *overrides, pause=True),
            cwd=REPO,
            env=_env(env, FT_PAUSE_AT=str(at_step), FT_MARKER=str(marker)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {log.read_text()[-4000:]}"
            assert time.time() < deadline, "the run never reached the pause step"
            time.sleep(0.02)
        proc.send_signal(sig)
        Path(str(marker) + ".go").touch()
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


# ---------------------------------------------------------------- reading results


def _steps(workdir):
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _state(workdir, step=None):
    """The whole train state saved at `step` (default: the latest), as numpy arrays on one device."""
    return read_state(workdir, step)


def _params(workdir):
    """The latest params through `load_params` (the `init_from` path), as numpy arrays."""
    device = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(workdir)["params"]
    )
    return jax.tree.map(np.asarray, load_params(workdir, abstract))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _losses(workdir):
    """{step: loss} from metrics.jsonl, asserting each step is logged once (resume rewrites the file)."""
    lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    losses = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    steps = [s for s, _ in losses]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return dict(losses)


def _events(workdir, name=None):
    events = read_events(workdir)
    return [e for e in events if e["event"] == name] if name else events


# ---------------------------------------------------------------- the reference run


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted 10-step run on 8 devices: the ground truth for the others."""
    workdir = env["root"] / "reference"
    _run_ok(env, workdir)
    assert _steps(workdir) == [6, 8, 10]
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    return {"workdir": workdir, "state": _state(workdir), "losses": losses}


def _copy_and_truncate(reference, dest, keep_up_to):
    """A copy of the finished reference workdir whose checkpoints after `keep_up_to` are gone."""
    shutil.copytree(reference["workdir"], dest)
    for step in _steps(dest):
        if step > keep_up_to:
            shutil.rmtree(dest / "checkpoints" / str(step))
    return dest


# ---------------------------------------------------------------- 1. exact resume


@pytest.mark.parametrize("async_save", [True, False])
def test_sigkill_then_rerun_resumes_bitwise(env, reference, tmp_path, async_save):
    workdir = tmp_path / "run"
    status, stderr = _interrupt(env, workdir, 5, signal.SIGKILL, f"checkpoint.async_save={async_save}")
    assert status == -signal.SIGKILL, stderr[-4000:]
    assert max(_steps(workdir)) < STEPS
    _run_ok(env, workdir, f"checkpoint.async_save={async_save}")

    resumes = _events(workdir, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] in (2, 4)  # the latest complete checkpoint
    _assert_trees_equal(_state(workdir), reference["state"])  # params, optimizer state, step, rng
    assert _losses(workdir) == reference["losses"]


# ---------------------------------------------------------------- 2. resume on another mesh


@pytest.mark.parametrize(
    "devices,mesh", [(4, ("data=1", "fsdp=-1")), (2, ("data=2", "fsdp=1")), (1, ("data=1", "fsdp=-1"))]
)
def test_resume_on_fewer_devices(env, reference, tmp_path, devices, mesh):
    workdir = _copy_and_truncate(reference, tmp_path / "run", keep_up_to=6)
    _run_ok(env, workdir, *(f"mesh.{m}" for m in mesh), devices=devices)

    assert [e["step"] for e in _events(workdir, "resume")] == [6]
    losses, want = _losses(workdir), reference["losses"]
    assert sorted(losses) == sorted(want)
    np.testing.assert_allclose(
        [losses[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5, atol=0
    )
    state = _state(workdir)
    assert int(state["step"]) == STEPS
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
        state["params"],
        reference["state"]["params"],
    )


# ---------------------------------------------------------------- 3. SIGTERM


@pytest.mark.parametrize("at_step,async_save", [(5, True), (4, True), (4, False)])
def test_sigterm_saves_exits_42_and_resumes_exactly(env, reference, tmp_path, at_step, async_save):
    workdir = tmp_path / "run"
    flag = f"checkpoint.async_save={async_save}"
    status, stderr = _interrupt(env, workdir, at_step, signal.SIGTERM, flag)
    assert status == PREEMPTED_EXIT_CODE, stderr[-4000:]
    assert [e["step"] for e in _events(workdir, "preempted")] == [at_step]
    assert max(_steps(workdir)) == at_step  # saved at the step boundary where it stopped

    _run_ok(env, workdir, flag)
    assert [e["step"] for e in _events(workdir, "resume")] == [at_step]
    _assert_trees_equal(_state(workdir), reference["state"])
    assert _losses(workdir) == reference["losses"]


# ---------------------------------------------------------------- 4. corrupted latest checkpoint


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_latest_checkpoint_falls_back_and_finishes(env, reference, tmp_path, damage):
    workdir = _copy_and_truncate(reference, tmp_path / "run", keep_up_to=8)  # keeps 6, 8
    files = sorted(
        p
        for p in (workdir / "checkpoints" / "8" / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    )
    assert files
    for f in files:
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(3)
        else:
            f.unlink()
    _run_ok(env, workdir)

    quarantined = _events(workdir, "checkpoint_quarantined")
    assert [e["step"] for e in quarantined] == [8] and quarantined[0]["error"]
    assert [p.name.split("-")[0] for p in (workdir / "quarantine").iterdir()] == ["8"]
    assert [e["step"] for e in _events(workdir, "resume")] == [6]
    _assert_trees_equal(_state(workdir), reference["state"])  # redoing steps 7-10 changes nothing
    assert _losses(workdir) == reference["losses"]


def test_torn_metrics_line_does_not_block_the_resume(env, reference, tmp_path):
    workdir = _copy_and_truncate(reference, tmp_path / "run", keep_up_to=6)
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    torn = [l for l in lines if json.loads(l)["step"] <= 7]
    (workdir / "metrics.jsonl").write_text("".join(torn)[:-40])  # the step-7 line, cut short
    _run_ok(env, workdir)
    _assert_trees_equal(_state(workdir), reference["state"])
    assert _losses(workdir) == reference["losses"]


# ---------------------------------------------------------------- 5. injected NaN


@pytest.mark.parametrize("nan_at,rolled_back_to", [(5, 4), (1, 0)])  # (1, 0): before any checkpoint
def test_injected_nan_is_rolled_back_and_the_run_finishes(env, reference, tmp_path, nan_at, rolled_back_to):
    workdir = tmp_path / "run"
    _run_ok(env, workdir, f"debug.nan_at_steps=({nan_at},)")

    bad = nan_at + 1  # nan_at is 0-based: the batch of the step that ends at nan_at + 1
    detected = _events(workdir, "divergence_detected")
    rollbacks = _events(workdir, "divergence_rollback")
    assert [e["step"] for e in detected] == [bad] and "non-finite" in detected[0]["reason"]
    assert [(e["from_step"], e["to_step"]) for e in rollbacks] == [(bad, rolled_back_to)]
    assert rollbacks[0]["skipped_batches"] == bad - rolled_back_to and rollbacks[0]["lr_scale"] == 0.5
    state = _state(workdir)
    assert int(state["step"]) == STEPS
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if "loss" in r][-1]
    assert last["step"] == STEPS and np.isfinite(last["loss"])
    # It went on with other data and half the lr: a different result, but it still learned.
    assert last["loss"] < reference["losses"][1] - 0.25  # it kept training


def test_steps_per_call_trains_like_the_reference_and_guards_every_step(env, reference, tmp_path):
    workdir = tmp_path / "run"
    _run_ok(env, workdir, "train.steps_per_call=2")
    losses = _losses(workdir)  # every step is logged, though the loop sees them two at a time
    assert sorted(losses) == sorted(reference["losses"])
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference["losses"][s] for s in sorted(losses)], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 _state(workdir)["params"], reference["state"]["params"])

    nan_dir = tmp_path / "nan"
    _run_ok(env, nan_dir, "train.steps_per_call=2", "debug.nan_at_steps=(4,)")
    # step 5 is the first of the call that runs steps 5 and 6: the guard names it, not the call's last step
    assert [e["step"] for e in _events(nan_dir, "divergence_detected")] == [5]
    assert [(e["from_step"], e["to_step"]) for e in _events(nan_dir, "divergence_rollback")] == [(5, 4)]
    assert int(_state(nan_dir)["step"]) == STEPS


def test_too_many_divergences_exit_43(env, reference, tmp_path):
    workdir = tmp_path / "run"
    proc = _run(env, workdir, "debug.nan_at_steps=(3,5,7)", "train.divergence.max_rollbacks=1")
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-4000:]
    assert "max_rollbacks=1" in proc.stderr
    assert [e["step"] for e in _events(workdir, "divergence_detected")] == [4, 6]
    assert len(_events(workdir, "divergence_rollback")) == 1


# ---------------------------------------------------------------- 6. config / checkpoint mismatch


@pytest.fixture(scope="module")
def mismatch(env, reference, tmp_path_factory):
    """Reruns the finished reference workdir with model.d_model=64 instead of 32."""
    workdir = _copy_and_truncate(reference, tmp_path_factory.mktemp("mismatch") / "run", keep_up_to=STEPS)
    before = _steps(workdir)
    proc = _run(env, workdir, "model.d_model=64")
    return workdir, before, proc


def test_resuming_with_other_shapes_is_one_clear_error(mismatch):
    workdir, before, proc = mismatch
    assert proc.returncode == 2, proc.stderr[-4000:]  # launch/train.py: bad config or input
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "does not match the current config" in errors[0]
    # Names the arrays and both shapes, e.g. "...blocks.attn.wq: checkpoint has shape (2, 32, 4, 8),
    # config expects (2, 64, 4, 16)".
    assert re.search(
        r"blocks\.attn\.wq: checkpoint has shape \(2, 32, 4, 8\), config expects \(2, 64, 4, 16\)",
        proc.stderr,
    ), proc.stderr[-4000:]
    assert _steps(workdir) == before and not (workdir / "quarantine").exists()  # a user error: kept
    assert not _events(workdir, "checkpoint_quarantined")


def test_shape_error_names_the_params_first(mismatch):
    _, _, proc = mismatch
    assert "params.blocks.attn.wq: checkpoint has shape (2, 32, 4, 8)" in proc.stderr
    assert "params.embed" in proc.stderr


# ---------------------------------------------------------------- 7. init_from


def test_init_from_loads_params_only_and_starts_at_step_0(env, reference, tmp_path):
    workdir = tmp_path / "finetune"
    # lr=0: the one step leaves the params as loaded, so its checkpoint shows what init_from gave.
    _run_ok(
        env,
        workdir,
        f"init_from={reference['workdir']}",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.lr=0.0",
    )

    assert not _events(workdir, "resume") and not _events(workdir, "checkpoint_restore")
    assert sorted(_losses(workdir)) == [1]
    state = _state(workdir)
    assert int(state["step"]) == 1  # a fresh state: step 0 + one step, not the source's 10
    _assert_trees_equal(state["params"], reference["state"]["params"])
    _assert_trees_equal(_params(workdir), reference["state"]["params"])
    # The source run's loss had come down; the fine-tune's first loss is on that scale, not init's.
    assert _losses(workdir)[1] < reference["losses"][1] - 0.2


# ---------------------------------------------------------------- fault injection under the supervisor


@pytest.mark.slow
def test_fault_injection_under_the_supervisor(tmp_path):
    """A small `benchmarks/fault_injection.py`: SIGKILLs at random moments change nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fault_injection", REPO / "benchmarks" / "fault_injection.py"
    )
    fault_injection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fault_injection)
    args = fault_injection.parse_args(
        [
            "--kills=4",
            "--steps=24",
            "--every_steps=4",
            "--devices=2",
            "--startup_kill_fraction=0.25",
            f"--workdir={tmp_path}",
        ]
    )
    result = fault_injection.run(args)
    report = fault_injection.format_report(result)
    assert result["supervisor_returncode"] == 0, report
    assert result["kills_survived"] == 4 and result["restarts"] == 4, report
    assert result["final_step"] == 24, report
    assert result["params_equal"] and result["state_equal"] and result["losses_equal"], report
    assert result["max_lost"] <= 4, report  # sync saves: at most one checkpoint interval redone

"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo collectives) form one 8-device
(data=2, fsdp=4) mesh, exactly as hosts of a pod or cluster do, and must train like one 8-device process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from maxlm import distributed
from maxlm.checkpoint import read_state
from maxlm.config import ConfigError, check_distributed
from maxlm.train.events import read_events
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 300

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

def get_config():
    c = tiny_config()
    c.train.update(steps=6, log_every=1, eval_every=0, eval_batches=1)
    c.mesh.update(data=2, fsdp=4, tensor=1)
    c.checkpoint.update(every_steps=2, keep_last=3)
    c.data.cache_dir = {cache!r}
    return c
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    config = root / "config.py"
    config.write_text(CONFIG.format(tests=str(TESTS), cache=str(root / "cache")))
    reference = root / "reference"  # 4 steps, then a resume to 6 (the schedule follows train.steps): as below
    for steps in (4, 6):  # the first run also caches the tokenizer
        _check(_start(config, reference, f"train.steps={steps}", devices=8).wait(TIMEOUT_S), "the 1-process reference")
    return {"root": root, "config": config, "reference": reference}


def _start(config, workdir, *overrides, devices, process_id=None, port=0):
    command = [sys.executable, str(REPO / "launch" / "train.py"), f"--config={config}", f"--workdir={workdir}",
               *(f"--config.{o}" for o in overrides)]
    if process_id is not None:
        command += [f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={process_id}", "--config.mesh.dcn_data=2"]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    with open(Path(str(workdir) + f".{process_id}.log"), "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _check(status, what):
    assert status == 0, f"{what} exited with {status}"


def _run_two_processes(config, workdir, *overrides):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_start(config, workdir, *overrides, devices=4, process_id=i, port=port) for i in range(2)]
    for i, proc in enumerate(procs):
        _check(proc.wait(TIMEOUT_S), f"process {i} (log: {workdir}.{i}.log)")


def _losses(workdir):
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"  # only process 0 writes
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_two_processes_train_checkpoint_and_resume_like_one(setup):
    workdir = setup["root"] / "two"
    _run_two_processes(setup["config"], workdir, "train.steps=4")  # stops after the step-4 checkpoint
    _run_two_processes(setup["config"], workdir)  # resumes at 4, runs to 6
    assert [e["step"] for e in read_events(workdir) if e["event"] == "resume"] == [4]
    expected, got = _losses(setup["reference"]), _losses(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 read_state(workdir)["params"], read_state(setup["reference"])["params"])
    assert len(list((workdir / "checkpoints" / "6" / "data").glob("process_*-of-2.json"))) == 2


def test_resuming_on_another_process_count_warns_that_the_data_order_changes(setup):
    workdir = setup["root"] / "change"
    _run_two_processes(setup["config"], workdir, "train.steps=2")
    _check(_start(setup["config"], workdir, devices=8).wait(TIMEOUT_S), "the 1-process resume")
    changed = [e for e in read_events(workdir) if e["event"] == "data_order_changed"]
    assert [(e["step"], e["saved_processes"], e["processes"]) for e in changed] == [(2, 2, 1)]
    assert int(read_state(workdir)["step"]) == 6


def test_cluster_environments_and_distributed_config_errors(monkeypatch):
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert distributed.cluster_environment() == "cloud_tpu"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.cluster_environment() == "slurm"
    config = tiny_config()
    check_distributed(config)
    config.distributed.coordinator_address = "localhost:1234"
    with pytest.raises(ConfigError, match="needs distributed.num_processes > 0"):
        check_distributed(config)
    config.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="0 <= distributed.process_id < num_processes"):
        check_distributed(config)
    config.distributed.update(coordinator_address="", process_id=1)
    with pytest.raises(ConfigError, match="need distributed.coordinator_address"):
        check_distributed(config)
    config.distributed.update(num_processes=0, process_id=-1, cpu_collectives="nccl")
    with pytest.raises(ConfigError, match="distributed.cpu_collectives='nccl' is not one of gloo, mpi"):
        check_distributed(config)


def test_logging_an_event_starts_no_jax_backend(tmp_path):
    """The supervisor (the parent of the training processes) logs events; it must not claim the accelerators."""
    probe = ("from jax._src import xla_bridge\nfrom maxlm.train.events import log_event\n"
             f"log_event({str(tmp_path)!r}, 'probe')\nprint(xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
    assert [e["event"] for e in read_events(tmp_path)] == ["probe"]

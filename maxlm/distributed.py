"""Multi-process (multi-host) start-up: ``jax.distributed`` on TPU pods, GPU clusters and local CPU processes.

JAX runs one process per host (or per GPU); ``jax.distributed.initialize`` connects them, after which
``jax.devices()`` lists every process's devices and the mesh spans them all. It must run before anything
touches a JAX backend. Three cases (``config.distributed``):

* ``coordinator_address`` (and ``num_processes``, ``process_id``) given: an explicit cluster, e.g. the
  local CPU test or a hand-made launch;
* none given but the environment is a cluster JAX recognises (SLURM with several tasks, a multi-host
  Cloud TPU slice, Open MPI): ``jax.distributed.initialize()`` reads everything from the environment;
* otherwise one process: nothing to do.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def cluster_environment() -> str | None:
    """The multi-process launcher JAX can configure itself from, or None (a single process)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "cloud_tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open_mpi"
    return None


def initialize(cfg) -> None:
    """Connects the processes of a multi-process run (``config.distributed``); a no-op for one process."""
    explicit = bool(cfg.coordinator_address)
    environment = cluster_environment()
    if not explicit and environment is None:
        return
    # CPU collectives across processes (the local multi-process test; harmless where the CPU is not used)
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if explicit:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
                 jax.process_count(), "explicit" if explicit else environment, jax.local_device_count(),
                 jax.device_count())
    if jax.process_index() != 0:  # process 0 speaks for the run; the others only warn and fail
        logging.set_verbosity(logging.WARNING)


def process_label() -> str:
    """``"process 3 of 8: "`` in a multi-process run, else ``""`` (prefixes error messages)."""
    return f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""

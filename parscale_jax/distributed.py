"""Joining a multi-host run: every process calls `initialize` before it touches a device.

On TPU pods, SLURM and Open MPI jobs JAX reads the cluster from the environment. Anywhere else
(several processes on one machine, a hand-made cluster) name the coordinator explicitly, with
command-line flags or the PARSCALE_COORDINATOR / PARSCALE_NUM_PROCESSES / PARSCALE_PROCESS_ID
environment variables.
"""

from __future__ import annotations

import os

from parscale_jax.errors import ConfigError


def _managed_cluster() -> str | None:
    """The kind of multi-process job JAX can configure itself for, if this is one."""
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Join the other processes, if there are any; returns how the run is set up, for the log."""
    import jax

    coordinator = coordinator or os.environ.get("PARSCALE_COORDINATOR")
    if num_processes is None and "PARSCALE_NUM_PROCESSES" in os.environ:
        num_processes = _int_env("PARSCALE_NUM_PROCESSES")
    if process_id is None and "PARSCALE_PROCESS_ID" in os.environ:
        process_id = _int_env("PARSCALE_PROCESS_ID")

    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator", "a coordinator address also needs --num-processes and "
                              "--process-id (or PARSCALE_NUM_PROCESSES and PARSCALE_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ConfigError("--process-id", f"must lie in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return f"process {process_id} of {num_processes} (coordinator {coordinator})"
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ConfigError("--coordinator", "--num-processes/--process-id need a coordinator address")
    cluster = _managed_cluster()
    if cluster:
        jax.distributed.initialize()
        return f"process {jax.process_index()} of {jax.process_count()} ({cluster})"
    return "single process"


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {os.environ[name]!r}") from None

"""Joining the processes of a multi-host job (`jax.distributed`).

On a TPU pod slice, under SLURM or Open MPI, jax reads the coordinator, the process count and
this process's id from the environment; local runs (several processes on one machine, as the
tests and `launch/local.sh` do) pass them explicitly in the config. Must run before anything
touches a JAX backend.
"""

from __future__ import annotations

import os

import jax

from flaxlm.config import ConfigError, DistributedConfig, DistributedInit


def cluster_environment() -> str | None:
    """The kind of multi-process job the environment describes, or None for a single process."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize(cfg: DistributedConfig) -> bool:
    """Joins the job's other processes if cfg (or the environment) says there are any.

    Returns whether jax.distributed was initialized. Safe to call twice.
    """
    if cfg.initialize == DistributedInit.never:
        return False
    if cfg.initialize == DistributedInit.auto and not (
        cfg.coordinator_address or cluster_environment()
    ):
        return False
    if jax.distributed.is_initialized():
        return True
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms.split(","):
        # CPU devices of different processes talk over gloo (the default has no collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.timeout_seconds,
        )
    except (RuntimeError, ValueError) as e:
        where = cfg.coordinator_address or cluster_environment() or "the environment"
        raise ConfigError(
            f"could not join the multi-process job via {where}: {str(e).splitlines()[0]}. Check "
            "distributed.coordinator_address (host:port reachable from every process), "
            "distributed.num_processes and distributed.process_id, or set "
            "distributed.initialize=never for a single process"
        ) from e
    return True

"""Flags and setup shared by the commands that run as several cooperating processes (sweep,
dreambench): joining jax.distributed before anything touches a device."""

from __future__ import annotations

import os

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0 (env CORE_JAX_COORDINATOR)"
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-host: number of processes (env CORE_JAX_NUM_PROCESSES)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-host: this process's index (env CORE_JAX_PROCESS_ID)"
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with the cluster's own settings "
    "(TPU pods, SLURM)"
)


def initialize_distributed() -> None:
    """Join a multi-process run when asked to: explicitly (flags or CORE_JAX_* variables, as
    launch/local_multiprocess.sh sets them) or from the cluster's environment (--distributed)."""
    import jax

    address = _COORDINATOR.value or os.environ.get("CORE_JAX_COORDINATOR")
    if address:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            address,
            _NUM_PROCESSES.value or int(os.environ["CORE_JAX_NUM_PROCESSES"]),
            _PROCESS_ID.value if _PROCESS_ID.value is not None
            else int(os.environ["CORE_JAX_PROCESS_ID"]),
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()

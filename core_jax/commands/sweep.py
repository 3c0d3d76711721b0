"""core-jax sweep --config configs/<sweep>.py --workdir DIR: many concepts x settings at once."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a sweep config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where runs/, sweep_summary.json and results go")
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
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
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


def _sweep(*args: Any) -> Any:
    from core_jax.train.sweep import sweep  # after the lock: the import takes seconds

    return sweep(*args, progress=lambda line: print(line, flush=True))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    _initialize_distributed()
    summary = run_reporting_input_errors(
        under_workdir_lock, _WORKDIR.value, "sweep", _sweep, _CONFIG.value, _WORKDIR.value
    )
    if summary is None:  # stopped by a signal; the line saying so is printed
        return
    brief = {k: summary[k] for k in ("runs", "failed", "compilations", "pack", "mesh", "wall_s")}
    print(json.dumps(brief))
    print(f"results: {_WORKDIR.value}/results.csv, {_WORKDIR.value}/sweep_summary.json")

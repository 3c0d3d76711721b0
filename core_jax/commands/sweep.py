"""core-jax sweep --config configs/<sweep>.py --workdir DIR: many concepts x settings at once."""

from __future__ import annotations

import json
from typing import Any

from absl import flags
from ml_collections import config_flags

from core_jax.commands.compile_cache_flag import start_compile_cache
from core_jax.commands.distributed import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "a sweep config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where runs/, sweep_summary.json and results go")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "trace this many steps (after the first) into WORKDIR/profile for "
    "TensorBoard's profile plugin"
)
flags.mark_flags_as_required(["config", "workdir"])


def _sweep(*args: Any) -> Any:
    from core_jax.train.sweep import sweep  # after the lock: the import takes seconds

    return sweep(*args, progress=lambda line: print(line, flush=True),
                 profile_steps=_PROFILE.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    initialize_distributed()
    start_compile_cache(_WORKDIR.value)
    summary = run_reporting_input_errors(
        under_workdir_lock, _WORKDIR.value, "sweep", _sweep, _CONFIG.value, _WORKDIR.value
    )
    if summary is None:  # stopped by a signal; the line saying so is printed
        return
    brief = {k: summary[k] for k in
             ("runs", "failed", "compilations", "pack", "mesh", "wall_s", "compile")}
    print(json.dumps(brief))
    print(f"results: {_WORKDIR.value}/results.csv, {_WORKDIR.value}/sweep_summary.json")

"""core-jax dreambench --config configs/dreambench_sd21.py --workdir DIR: DreamBench end to end."""

from __future__ import annotations

import json
from typing import Any

from absl import flags
from ml_collections import config_flags

from core_jax.commands.compile_cache_flag import start_compile_cache
from core_jax.commands.distributed import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "a dreambench config",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "where runs/, samples/, scores.jsonl, results.json/.md and grids/ go")
flags.mark_flags_as_required(["config", "workdir"])


def _dreambench(*args: Any) -> Any:
    from core_jax.eval.dreambench_run import run_dreambench  # after the lock: slow import

    return run_dreambench(*args, log=lambda line: print(line, flush=True))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    initialize_distributed()
    compiling = start_compile_cache(_WORKDIR.value)
    results = run_reporting_input_errors(
        under_workdir_lock, _WORKDIR.value, "dreambench", _dreambench, _CONFIG.value,
        _WORKDIR.value,
    )
    if results is None:  # stopped by a signal; the line saying so is printed
        return
    brief = {m: {k: round(v[k]["mean"], 4) for k in ("clip_t", "clip_i", "dino") if v[k]}
             for m, v in results["methods"].items()}
    print(json.dumps({"methods": brief, "work": results["work"]}))
    print(compiling.line())

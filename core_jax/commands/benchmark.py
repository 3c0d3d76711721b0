"""core-jax benchmark --config configs/toy_benchmark.py --workdir DIR: the method table.

Trains every (held-out concept, method) run of the toy world as one sweep, samples the benchmark
prompts with each learned word, scores the images with the attribute classifiers and writes
DIR/results.md, DIR/results.json, DIR/scores.csv and DIR/grid_<method>.png (and, with
benchmark.lambda_search, DIR/lambda_search.json and DIR/lambda_curve_<method>.png). Rerunning
skips finished work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a benchmark config (configs/toy_benchmark.py)", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where runs/, results.md/.json and grids go")
flags.mark_flags_as_required(["config", "workdir"])


def _run(*args: Any) -> Any:
    # Imported inside the error reporting: JAX and transformers take seconds to import.
    from core_jax.toyworld.benchmark import run_benchmark

    return run_benchmark(*args, log=lambda line: print(line, flush=True))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    run_reporting_input_errors(
        under_workdir_lock, _WORKDIR.value, "benchmark", _run, _CONFIG.value, _WORKDIR.value
    )
    workdir = Path(_WORKDIR.value)
    print("\n" + (workdir / "results.md").read_text())
    print(f"results: {workdir}/results.md, {workdir}/results.json, {workdir}/scores.csv (every "
          f"image), {workdir}/grid_<method>.png"
          + (f", {workdir}/lambda_search.json, {workdir}/lambda_curve_<method>.png"
             if (workdir / "lambda_search.json").is_file() else ""))

"""Runs per hour of stage-1 CoRe: one run at a time (each compiling, as separate processes do)
against C runs packed into one compiled step, measured side by side in one process.

    python benchmarks/sweep_throughput.py --preset tiny --steps 50 --runs 4 --packs 8,16
    python benchmarks/sweep_throughput.py --preset bench_small --steps 10 --runs 2 --packs 8

"one at a time" = compile + `steps` steps per run (model loading not counted, which favours it);
"packed C" = one compile, then ceil(runs_total / C) packs of `steps` steps, each step training C
runs. The compilation cache is off so each one-at-a-time run really compiles.
Prints one JSON line per mode and a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402

from core_jax.train.parallel import make_mesh  # noqa: E402
from core_jax.train.step import shard_step  # noqa: E402
from core_jax.train.synthetic import random_setup  # noqa: E402

# Stage-1 CoRe as the default config runs it (the paper's variants), at the official weights.
CORE = dict(learning_rate=5e-3, lambda_emb=1.5e-4, lambda_attn=0.05)


def timed_runs(preset: str, num_concepts: int, steps: int, batch: int, packs: int) -> float:
    """Wall seconds for `packs` packs of `num_concepts` runs: one compile per call of this
    function, `steps` steps per pack."""
    setup = random_setup(preset, num_concepts=num_concepts, batch_size=batch, **CORE)
    mesh = make_mesh(1, jax.devices()[:1])
    start = time.perf_counter()
    step_fn = shard_step(mesh, setup.program)
    for _ in range(packs):
        state = jax.tree.map(lambda x: x.copy(), setup.state)
        for _ in range(steps):
            state, metrics = step_fn(state, *setup.args()[1:])
        jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2, help="rows per run per step")
    parser.add_argument("--runs", type=int, default=4, help="one-at-a-time runs to time")
    parser.add_argument("--packs", default="8,16", help="pack sizes C to time")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)

    results = []
    wall = sum(timed_runs(args.preset, 1, args.steps, args.batch, 1) for _ in range(args.runs))
    results.append({"mode": "one at a time", "C": 1, "runs": args.runs, "wall_s": wall})
    for c in (int(x) for x in args.packs.split(",")):
        wall = timed_runs(args.preset, c, args.steps, args.batch, 1)
        results.append({"mode": "packed", "C": c, "runs": c, "wall_s": wall})
    for r in results:
        r.update(preset=args.preset, steps=args.steps, batch_per_run=args.batch,
                 runs_per_hour=3600 * r["runs"] / r["wall_s"])
        print(json.dumps(r))
    base = results[0]["runs_per_hour"]
    print(json.dumps({"speedup_vs_one_at_a_time": {
        f"C={r['C']}": round(r["runs_per_hour"] / base, 2) for r in results[1:]
    }}))


if __name__ == "__main__":
    main()

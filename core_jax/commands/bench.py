"""core-jax bench --config configs/bench_small.py [--variants ti,core] [--vs-torch] [--json]

Times the compiled steps per variant (and, with --scaling, with the config's
`scaling.concepts` packed per step, e.g. --config.scaling.concepts=1,4,8,16; with --components,
single pieces such as the U-Net and its attention). Prints a Markdown table, or one JSON line
per measurement with --json. MFU is XLA's FLOPs per second over the chip's peak for the dtype
(`core_jax.bench.peaks`; blank on CPUs and unknown chips unless --config.peak_tflops=N gives
it). See `core_jax.bench`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from core_jax.commands.compile_cache_flag import start_compile_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/bench_tiny.py", "a configs/bench_*.py file", lock_config=True
)
_VARIANTS = flags.DEFINE_string(
    "variants", None, "comma-separated subset of ti,emb,attn,core,core_all,unet,lora,svdiff,"
    "dreambooth,custom_diffusion,class_diffusion,textboost,xti,attn_dreambooth,tto,sample "
    "(default: the config's)"
)
_VS_TORCH = flags.DEFINE_bool(
    "vs-torch", False, "also run benchmarks/torch_reference.py's run_benchmark, interleaved"
)
_JSON = flags.DEFINE_bool("json", False, "one JSON line per measurement instead of tables")
_SCALING = flags.DEFINE_bool(
    "scaling", False, "also time the config's scaling.variant with scaling.concepts packed"
)
_COMPONENTS = flags.DEFINE_string(
    "components", None, "time only these pieces instead (attention,group_norm,unet)"
)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax import bench

    config = _CONFIG.value
    as_json = _JSON.value
    compiling = start_compile_cache()
    environment = bench.environment(vs_torch=_VS_TORCH.value)
    peak = bench.peak_flops(environment["device"], config.dtype, config.get("peak_tflops", 0.0))
    environment["peak_tflops"] = None if peak is None else peak / 1e12
    environment["compile_cache"] = str(compiling.cache_dir) if compiling.cache_dir else None
    if as_json:
        print(json.dumps({"environment": environment}), flush=True)
    else:
        print("\n".join(f"{key}: {value}" for key, value in environment.items()), flush=True)
    if environment["load_average"][0] > 0.5 * (os.cpu_count() or 1):
        # PyTorch's OpenMP threads wait on each other at every op: with a core taken by another
        # process its steps were measured 10-20x slower here, JAX's about 1.5x.
        print("core-jax bench: warning: the machine is busy (load average "
              f"{environment['load_average'][0]}); timings, PyTorch's most, will be inflated",
              file=sys.stderr, flush=True)

    def emit(result: bench.Result) -> None:
        if as_json:
            print(result.to_json(), flush=True)
        else:
            print(f"  {result.framework} {result.variant}: {result.median_s:.3f} s "
                  f"{result.note}", file=sys.stderr, flush=True)

    def report(title: str, results: list[bench.Result]) -> None:
        if as_json or not results:
            return
        print(f"\n## {title}\n\n{bench.format_table(results)}")
        comparison = bench.format_comparison(results)
        if comparison:
            print(f"\nJAX / torch (median):\n{comparison}")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload average at the end: {load}", flush=True)

    if _COMPONENTS.value:
        results = bench.run_components(
            _split(_COMPONENTS.value), repeats=config.steps, vs_torch=_VS_TORCH.value,
            torch_threads=config.torch_threads or None, emit=emit,
        )
        report("components (forward + backward)", results)
        return

    variants = _split(config.variants if _VARIANTS.value is None else _VARIANTS.value)
    scaling = _split(config.scaling.concepts) if _SCALING.value else []
    concepts = max([int(c) for c in scaling] or [1])
    setup = bench.build_setup(
        config.preset, config.batch, concepts, config.dtype,
        config.get("attention", "auto"), config.get("remat", "none"),
    )
    results = bench.run_suite(
        config.preset, variants, batch=config.batch, steps=config.steps, warmup=config.warmup,
        vs_torch=_VS_TORCH.value, torch_threads=config.torch_threads or None,
        sample_batch=config.sample.batch, sample_steps=config.sample.num_inference_steps,
        sample_chains=config.sample.chains,
        setup=setup, peak_flops=peak, emit=emit,
    )
    options = f", remat {config.remat}" if config.get("remat", "none") != "none" else ""
    report(f"{config.preset}, batch {config.batch}, {config.steps} steps, JAX in {config.dtype}"
           f"{options}", results)
    if scaling:
        scaled = bench.run_scaling(
            config.preset, [int(c) for c in scaling], variant=config.scaling.variant,
            batch_per_concept=config.scaling.batch_per_concept, steps=config.scaling.steps,
            warmup=config.warmup, setup=setup, peak_flops=peak, emit=emit,
        )
        report(
            f"{config.scaling.variant} with C concepts packed, "
            f"{config.scaling.batch_per_concept} rows each (/ TI column: relative to C = 1)",
            scaled,
        )
    print(compiling.line(), file=sys.stderr, flush=True)

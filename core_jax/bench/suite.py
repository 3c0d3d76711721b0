"""The suites: every variant measured in JAX (and in PyTorch, interleaved), and C concepts packed.

Each JAX variant is measured the same way: trace + lower (`jit(...).lower`), XLA compile
(`.compile()`) and the first call of the compiled program, each timed on its own; then steady
steps, each blocked on its result (as the PyTorch loop's `.item()`), carrying the donated state
from step to step. FLOPs come from XLA's cost analysis of the same step traced with explicit
attention (the analysis counts a loop body once, so the chunked attention's loops would hide
most of the attention FLOPs); for `sample`, one guided U-Net call times the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from core_jax.bench.measure import PeakRss, Result, time_program
from core_jax.bench.programs import (
    STAGE1_TERMS,
    TORCH_VARIANTS,
    VARIANTS,
    build_setup,
    num_concepts,
    sample_flops,
    sample_program,
    step_flops,
    step_program,
    variant_setup,
    with_concepts,
)
from core_jax.bench.reference import load_torch_reference
from core_jax.train.synthetic import Setup


def measure_jax(
    setup: Setup,
    preset: str,
    variant: str,
    *,
    steps: int,
    warmup: int = 1,
    sample_batch: int = 1,
    sample_steps: int = 50,
    peak_flops: float | None = None,
) -> Result:
    """Time one JAX variant on `setup` (see the module docstring for what is timed); with the
    chip's `peak_flops` (FLOP/s), its MFU."""
    trainable_mb = None
    if variant == "sample":
        program = sample_program(setup, sample_batch, sample_steps)
        flops = sample_flops(setup, program, sample_steps)
        batch = sample_batch
        note = f"one {sample_steps}-step DDIM chain per step; 2 x {sample_batch} U-Net rows (CFG)"
    else:
        staged = variant_setup(setup, variant)
        flops = step_flops(staged)
        program = step_program(staged)
        batch, note = staged.program.batch_size * num_concepts(staged), ""
        trainable_mb = trainable_state_mb(staged)
    timing = time_program(program, steps=steps, warmup=warmup, flops=flops)
    rate = timing["flops_per_s"]
    return Result(
        variant=variant, framework="jax", preset=preset, batch=batch,
        concepts=num_concepts(setup), examples_per_s=batch / timing["median_s"],
        dtype=jnp.dtype(setup.unet.dtype).name, trainable_mb=trainable_mb, note=note,
        mfu=rate / peak_flops if rate and peak_flops else None, **timing,
    )


def trainable_state_mb(setup: Setup) -> float:
    """MB one run trains and carries from step to step: its trained parameter groups and their
    optimizer state (what a packed run adds; the frozen models are shared)."""
    state = setup.state
    trained = [state.params[group] for group in setup.program.trains]
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves((trained, state.opt_state)))
    return round(nbytes / num_concepts(setup) / 2**20, 2)


def measure_torch(
    preset: str, variant: str, *, batch: int, steps: int, warmup: int, threads: int | None
) -> Result:
    """benchmarks/torch_reference.py's `run_benchmark` in this process, as a `Result`."""
    reference = load_torch_reference()
    with PeakRss() as rss:
        r = reference.run_benchmark(
            preset, variant, steps=steps, batch=batch, warmup=warmup, threads=threads
        )
    return Result(
        variant=variant, framework="torch", preset=preset, batch=r["batch"], steps=r["steps"],
        median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"],
        examples_per_s=r["examples_per_s"], peak_rss_mb=rss.peak_mb,
        note=f"torch {r['torch_version']}, {r['threads']} threads",
    )


def _ordered(variants: Sequence[str]) -> list[str]:
    """TI first, so every later variant's ratio to it is known when it is reported."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    return sorted(dict.fromkeys(variants), key=lambda v: v != "ti")


def run_suite(
    preset: str,
    variants: Sequence[str],
    *,
    batch: int,
    steps: int,
    warmup: int = 1,
    vs_torch: bool = False,
    torch_threads: int | None = None,
    sample_batch: int = 1,
    sample_steps: int = 50,
    sample_chains: int | None = None,
    setup: Setup | None = None,
    peak_flops: float | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """Every variant in JAX, each followed by the same variant in PyTorch when `vs_torch`
    (interleaved, so slow drifts of the machine hit both alike). `emit` sees each result as it
    is made; ratios to TI are filled in when TI is among the variants. `sample` times
    `sample_chains` whole chains (default: `steps`)."""
    setup = setup or build_setup(preset, batch)
    if num_concepts(setup) != 1 or setup.program.batch_size != batch:
        setup = with_concepts(setup, 1, batch)
    results: list[Result] = []
    ti: dict[str, float] = {}
    for variant in _ordered(variants):
        timed = (sample_chains or steps) if variant == "sample" else steps
        runs = [lambda v=variant, n=timed: measure_jax(
            setup, preset, v, steps=n, warmup=warmup, sample_batch=sample_batch,
            sample_steps=sample_steps, peak_flops=peak_flops,
        )]
        if vs_torch and variant in TORCH_VARIANTS:
            runs.append(lambda v=variant: measure_torch(
                preset, v, batch=batch, steps=steps, warmup=warmup, threads=torch_threads
            ))
        for run in runs:
            result = run()
            if result.variant == "ti":
                ti[result.framework] = result.median_s
            if result.framework in ti and result.variant != "sample":
                result.ratio_to_ti = result.median_s / ti[result.framework]
            results.append(result)
            emit(result)
    return results


def run_scaling(
    preset: str,
    concepts: Sequence[int],
    *,
    variant: str = "core",
    batch_per_concept: int,
    steps: int,
    warmup: int = 1,
    setup: Setup | None = None,
    peak_flops: float | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """The stage-1 `variant` with C concepts packed in one step, `batch_per_concept` rows each;
    `ratio_to_ti` here is the step time relative to the smallest C (ideal scaling: C), and
    `per_concept_ratio` the cost of one concept-step relative to it (packing pays below 1)."""
    if variant not in STAGE1_TERMS:
        raise ValueError(f"scaling runs a stage-1 variant, one of {tuple(STAGE1_TERMS)}")
    setup = setup or build_setup(preset, batch_per_concept, max(concepts))
    results: list[Result] = []
    for count in sorted(concepts):
        result = measure_jax(
            with_concepts(setup, count, batch_per_concept), preset, variant, steps=steps,
            warmup=warmup, peak_flops=peak_flops,
        )
        result.per_concept_s = result.median_s / count
        base = results[0] if results else result
        result.per_concept_ratio = result.per_concept_s / base.per_concept_s
        result.ratio_to_ti = result.median_s / base.median_s
        result.note = (
            f"{count} concepts x {batch_per_concept} rows: {result.per_concept_s:.3f} s per "
            f"concept-step, {result.per_concept_ratio:.2f} x C = {base.concepts}'s"
        )
        results.append(result)
        emit(result)
    return results

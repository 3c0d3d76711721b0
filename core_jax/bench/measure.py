"""Measuring: time, memory and FLOPs of a compiled program, and the record of one measurement.

Nothing here knows about models or methods: a `Program` is a jitted function with its
arguments, and `time_program` lowers, compiles and runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from core_jax.compile_cache import CompileRecord


@dataclasses.dataclass
class Result:
    """One variant's measurement; times in seconds, memory in MB, FLOPs per step."""

    variant: str
    framework: str
    preset: str
    batch: int  # examples per step, all concepts together
    steps: int  # timed steps
    median_s: float
    min_s: float
    max_s: float
    examples_per_s: float
    concepts: int = 1
    lower_s: float | None = None
    compile_s: float | None = None
    compile_cached: bool | None = None  # compile_s was a read of JAX's persistent cache
    first_call_s: float | None = None
    peak_rss_mb: float | None = None  # process RSS, sampled during the first call and steps
    xla_temp_mb: float | None = None  # XLA's scratch buffer for one call (memory analysis)
    device_peak_mb: float | None = None  # accelerators only
    # What one run trains and carries from step to step: its params and their optimizer state.
    trainable_mb: float | None = None
    flops: float | None = None
    flops_per_s: float | None = None
    # flops_per_s over the chip's peak for the compute dtype (`core_jax.bench.peaks`); None on
    # CPUs and chips the table lacks, unless a peak was given.
    mfu: float | None = None
    # --scaling: seconds per concept-step (median_s / concepts) and its ratio to C = 1's.
    per_concept_s: float | None = None
    per_concept_ratio: float | None = None
    ratio_to_ti: float | None = None  # median_s / the same framework's TI median_s
    dtype: str = "float32"  # compute dtype
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class PeakRss:
    """Samples this process's resident memory every few milliseconds while active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process's lifetime peak is the best there is
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak_bytes = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def device_peak_mb() -> float | None:
    """The first device's peak memory in use (accelerators report it; CPU does not)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 1)


def flops(lowered: jax.stages.Lowered) -> float | None:
    """XLA's FLOP count of a lowered program (a loop body counts once)."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


@dataclasses.dataclass
class Program:
    """A jitted function with its first arguments; `carry(output, args)` gives the next call's
    arguments (the donated state moves forward), or None to reuse `args`."""

    jitted: Any
    args: tuple
    carry: Callable[[Any, tuple], tuple] | None = None


def time_program(
    program: Program, *, steps: int, warmup: int, flops: float | None
) -> dict[str, Any]:
    """Lower, compile and run `program`: the timing fields of a `Result`."""
    start = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    lowered_at = time.perf_counter()
    compiling = CompileRecord()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    compile_cached = compiling.summary()["cache_hits"] > 0
    memory = compiled.memory_analysis()
    args = jax.device_put(program.args, compiled.input_shardings[0])
    times = []
    with PeakRss() as rss:
        for _ in range(1 + warmup + steps):
            begin = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - begin)
            if program.carry is not None:
                args = program.carry(out, args)
    steady = times[1 + warmup:]
    median = statistics.median(steady)
    return dict(
        steps=steps, median_s=median, min_s=min(steady), max_s=max(steady),
        lower_s=lowered_at - start, compile_s=compiled_at - lowered_at,
        compile_cached=compile_cached, first_call_s=times[0],
        peak_rss_mb=rss.peak_mb, device_peak_mb=device_peak_mb(),
        xla_temp_mb=round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
        flops=flops, flops_per_s=flops / median if flops else None,
    )


def interleaved(candidates: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Seconds per call of each candidate, called round-robin `repeats` times after one
    untimed call each: on a shared machine, load changes hit every candidate alike."""
    for fn in candidates:
        fn()
    times: list[list[float]] = [[] for _ in candidates]
    for _ in range(repeats):
        for fn, record in zip(candidates, times, strict=True):
            begin = time.perf_counter()
            fn()
            record.append(time.perf_counter() - begin)
    return times

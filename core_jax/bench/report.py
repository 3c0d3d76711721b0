"""Reporting: the machine and versions next to the numbers, Markdown tables, JAX / torch ratios.
One JSON line per measurement is `Result.to_json` (`core_jax.bench.measure`)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from core_jax import _runtime
from core_jax.bench.measure import Result


def environment(vs_torch: bool = False) -> dict[str, Any]:
    """Machine, versions and runtime settings, for the record next to the numbers."""
    import flax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}",
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "allocator": _runtime.allocator_in_use(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if vs_torch:
        import torch

        info["torch"] = torch.__version__
    return info


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of `results`, one row each."""
    header = (
        "| variant | framework | C | batch | median s | min s | max s | ex/s | lower s | compile s"
        " | first call s | peak RSS MB | XLA temp MB | trainable MB/run | GFLOP/step | GFLOP/s"
        " | MFU % | / TI | note |"
    )
    rows = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for r in results:
        gflops = None if r.flops is None else r.flops / 1e9
        rate = None if r.flops_per_s is None else r.flops_per_s / 1e9
        cached = " (cached)" if r.compile_cached else ""  # a cache read, not XLA's compile
        rows.append(
            f"| {r.variant} | {r.framework} | {r.concepts} | {r.batch} | {_fmt(r.median_s)}"
            f" | {_fmt(r.min_s)} | {_fmt(r.max_s)} | {_fmt(r.examples_per_s, 2)}"
            f" | {_fmt(r.lower_s, 1)} | {_fmt(r.compile_s, 1)}{cached}"
            f" | {_fmt(r.first_call_s, 2)}"
            f" | {_fmt(r.peak_rss_mb, 0)} | {_fmt(r.xla_temp_mb, 0)} | {_fmt(r.trainable_mb, 2)}"
            f" | {_fmt(gflops, 1)}"
            f" | {_fmt(rate, 1)} | {_fmt(None if r.mfu is None else 100 * r.mfu, 1)}"
            f" | {_fmt(r.ratio_to_ti, 2)} | {r.note} |"
        )
    return "\n".join(rows)


def format_comparison(results: Sequence[Result]) -> str:
    """JAX / torch median ratios for variants measured in both (below 1: JAX is faster)."""
    lines = []
    for r in results:
        if r.framework != "jax":
            continue
        torch_result = next(
            (t for t in results if t.framework == "torch" and t.variant == r.variant), None
        )
        if torch_result is None:
            continue
        label = f"{r.variant} ({r.note})" if r.note and r.batch == 0 else r.variant
        lines.append(
            f"{label}: JAX {r.median_s:.3f} s / torch {torch_result.median_s:.3f} s"
            f" = {r.median_s / torch_result.median_s:.2f}"
        )
    return "\n".join(lines)

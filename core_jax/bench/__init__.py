"""Benchmarks of the compiled programs (`core-jax bench`): compile time, step time, memory and
FLOPs per variant, side by side with PyTorch, with C concepts packed, and of single components.

- `measure`: timing, memory and FLOP counting of a jitted program; `Result`, one measurement.
- `programs`: the variants (ti, emb, attn, core, core_all, unet, sample) and how each program is
  built from one random-weight setup (`core_jax.train.synthetic`) and the methods.
- `suite`: every variant in JAX (and PyTorch, interleaved), and the C-concept scaling.
- `components`: attention, group norm and U-Net forward + backward, against PyTorch.
- `report`: the environment record and the Markdown tables.
- `peaks`: peak FLOP/s per chip and dtype, for MFU.
- `reference`: `benchmarks/torch_reference.py`, loaded by path (the one way it is imported).
"""

from core_jax.bench.components import COMPONENTS, NO_YNN_CONVOLUTIONS, run_components
from core_jax.bench.measure import Program, Result, flops, time_program
from core_jax.bench.peaks import PEAK_TFLOPS, chip_of, peak_flops
from core_jax.bench.programs import (
    STAGE1_TERMS,
    TORCH_MATCHED_WEIGHTS,
    TORCH_VARIANTS,
    VARIANTS,
    build_setup,
    sample_program,
    stage1_program,
    step_program,
    unet_program,
    variant_setup,
    with_concepts,
)
from core_jax.bench.reference import load_torch_reference
from core_jax.bench.report import environment, format_comparison, format_table
from core_jax.bench.suite import (
    measure_jax,
    measure_torch,
    run_scaling,
    run_suite,
    trainable_state_mb,
)

__all__ = [
    "COMPONENTS", "NO_YNN_CONVOLUTIONS", "PEAK_TFLOPS", "STAGE1_TERMS", "TORCH_MATCHED_WEIGHTS",
    "TORCH_VARIANTS", "VARIANTS", "Program", "Result", "build_setup", "chip_of", "environment",
    "flops", "format_comparison", "format_table", "load_torch_reference", "measure_jax",
    "measure_torch", "peak_flops", "run_components", "run_scaling", "run_suite", "sample_program",
    "stage1_program", "step_program", "time_program", "trainable_state_mb", "unet_program",
    "variant_setup", "with_concepts",
]

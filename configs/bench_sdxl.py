"""Benchmark the SDXL steps: TI, CoRe and CoRe's test-time step on SDXL's topology.

What it runs: the stage-1 step (both text encoders, the concatenated context, the pooled
embedding and add-time ids in every U-Net pass) with TI only, CoRe (L_emb + L_attn) and the
test-time step (regularizers only), and the stage-2 U-Net step, on random weights. Here the
`tiny_sdxl` preset (SDXL's blocks and per-block transformer depths at tiny widths, 8x8
latents); on an accelerator pass `--config.preset=sdxl` for SDXL base's real shapes (2.6 G U-Net
parameters, 128x128 latents; stage 2's fp32 U-Net copy and AdamW's two moments are about
31 GB per run: arithmetic, not measured).

Commands:
    core-jax bench --config configs/bench_sdxl.py
    core-jax bench --config configs/bench_sdxl.py --config.preset=sdxl --config.dtype=bfloat16

Time here (2-core CPU): about 16 minutes measured under load (8), nearly all of it compiling.
What to expect: FLOPs per step (exact, from XLA): CoRe about 2x TI (0.9 against 0.4 GFLOP
measured), the test-time step CoRe's less the caption pass; times on this CPU say little
about accelerators.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "tiny_sdxl"
    c.dtype = "float32"  # JAX's compute dtype (parameters stay float32); bfloat16 on accelerators
    # The U-Net's attention implementation and rematerialization, as a run's model.attention
    # and model.remat (core_jax.config): "auto" / "none" unless measuring them.
    c.attention = "auto"
    c.remat = "none"
    c.batch = 2  # rows per step (one concept)
    c.steps = 5  # timed steps per variant, after the first call and `warmup` more
    c.warmup = 1
    c.variants = "ti,core,tto,unet"  # the sampling chain of bench/programs has no SDXL path yet
    # Peak TFLOP/s of one chip for MFU; 0: from core_jax.bench.peaks by the device's name
    # (none on CPUs).
    c.peak_tflops = 0.0
    c.torch_threads = 0
    c.sample = ml_collections.ConfigDict(dict(batch=1, num_inference_steps=50, chains=1))
    c.scaling = ml_collections.ConfigDict(
        dict(variant="core", concepts="1,2", batch_per_concept=1, steps=3)
    )
    return c

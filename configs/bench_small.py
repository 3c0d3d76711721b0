"""Benchmark on DESIGN.md's bench-small shapes: the numbers of BENCHMARKS.md.

What it runs: the stage-1 step (SD 1.x topology U-Net 64/128/256/256 at 32x32 latents, CLIP
text encoder 256 wide, random weights, fp32, batch 6, latents given) with TI only, + L_emb,
+ L_attn, CoRe (both) and CoRe + pairwise + hinge; the stage-2 step (the whole U-Net trains); a
50-step guided DDIM chain for one image. Loss variants and weights match
benchmarks/torch_reference.py (the official code's). With --vs-torch each variant is followed by
the same one in PyTorch; with --scaling, CoRe with 1, 2, 4, 8 concepts packed per step (one row
each).

Commands:
    core-jax bench --config configs/bench_small.py --variants ti,core --vs-torch
    core-jax bench --config configs/bench_small.py --variants ti,core,unet,lora,svdiff
    core-jax bench --config configs/bench_small.py --scaling --variants ti
    core-jax bench --config configs/bench_small.py --components attention,group_norm,unet \
        --vs-torch
    core-jax bench --config configs/bench_small.py --variants core --config.remat=unet_block

Time here (2-core CPU, idle): ti,core with --vs-torch about 5 minutes; every variant about
9 minutes (15 with --vs-torch); --scaling adds about 5; --components about 3; lora and svdiff
about 1 minute each.
What to expect: compile 20-60 s per variant; JAX's CoRe step at or below PyTorch's, and its
CoRe/TI ratio (about 2.3: the y_cat forward and the doubled U-Net batch) at or below PyTorch's.
With --config.remat=unet_block (or transformer_block) the CoRe step's XLA temp memory
falls about 2.6x (1447 to 553 MB) for about 15 % more time. See BENCHMARKS.md for measured
values.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "bench_small"
    # JAX's compute dtype (parameters stay float32); "bfloat16" on accelerators. PyTorch's side
    # (--vs-torch) stays float32.
    c.dtype = "float32"
    # The U-Net's attention implementation and rematerialization, as a run's model.attention
    # and model.remat (core_jax.config): "auto" / "none" unless measuring them.
    c.attention = "auto"
    c.remat = "none"
    c.batch = 6  # rows per step (one concept)
    c.steps = 10  # timed steps per variant, after the first call and `warmup` more
    c.warmup = 1
    c.variants = "ti,emb,attn,core,core_all,unet,sample"
    # Peak TFLOP/s of one chip for MFU; 0: from core_jax.bench.peaks by the device's name
    # (none on CPUs).
    c.peak_tflops = 0.0
    c.torch_threads = 0  # 0: all cores, as JAX uses
    # `chains` whole 50-step chains are timed (each is 50 U-Net calls).
    c.sample = ml_collections.ConfigDict(dict(batch=1, num_inference_steps=50, chains=3))
    c.scaling = ml_collections.ConfigDict(
        dict(variant="core", concepts="1,2,4,8", batch_per_concept=1, steps=10)
    )
    return c

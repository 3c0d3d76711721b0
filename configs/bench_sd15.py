"""Benchmark on Stable Diffusion 1.5's real shapes (random weights): the cost at full size.

What it runs: the stage-1 step on SD 1.5's U-Net (320/640/1280/1280, 64x64 latents, 4096-token
self-attention) and CLIP ViT-L/14 text encoder, fp32, with TI only and CoRe, plus the stage-2
step; batch 1 on CPU (DESIGN.md: 6 on a GPU, `--config.batch=6`). Loss variants and weights
match benchmarks/torch_reference.py.

Commands:
    core-jax bench --config configs/bench_sd15.py
    core-jax bench --config configs/bench_sd15.py --vs-torch --config.steps=3
    # on a GPU, DESIGN.md's check: stage-1 CoRe at batch 6 in bf16 and fp32 (the MFU column:
    # GFLOP/s over the card's peak), and the cost per concept with 1-16 packed
    core-jax bench --config configs/bench_sd15.py --variants ti,core --config.batch=6 \
        --config.dtype=bfloat16 --scaling
    # all of it, bf16 and fp32, into one JSON file: bash launch/gpu_check.sh

Time here (2-core CPU): long. Each variant compiles for minutes and a CoRe step takes tens of
seconds; the default (ti, core, unet; 3 timed steps each) is about half an hour. On a GPU,
seconds per variant.
What to expect: the same CoRe/TI ratio as bench-small (about 2.3), more of the step in
convolutions and the 4096-token attention; about 10 GB of host memory for CoRe at batch 1.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "sd15"
    # JAX's compute dtype (parameters stay float32); "bfloat16" on accelerators. PyTorch's side
    # (--vs-torch) stays float32.
    c.dtype = "float32"
    # The U-Net's attention implementation and rematerialization, as a run's model.attention
    # and model.remat (core_jax.config): "auto" / "none" unless measuring them.
    c.attention = "auto"
    c.remat = "none"
    c.batch = 1
    c.steps = 3
    c.warmup = 0
    c.variants = "ti,core,unet"
    # Peak TFLOP/s of one chip for MFU; 0: from core_jax.bench.peaks by the device's name
    # (none on CPUs).
    c.peak_tflops = 0.0
    c.torch_threads = 0
    # `chains` whole 50-step chains are timed (each is 50 U-Net calls).
    c.sample = ml_collections.ConfigDict(dict(batch=1, num_inference_steps=50, chains=1))
    # Up to 16 concepts packed is for accelerators; on a CPU, --config.scaling.concepts=1,2.
    c.scaling = ml_collections.ConfigDict(
        dict(variant="core", concepts="1,2,4,8,16", batch_per_concept=1, steps=3)
    )
    return c

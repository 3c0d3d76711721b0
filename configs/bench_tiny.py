"""Benchmark on the tiny preset: every variant, a few steps; checks the machinery, not speed.

What it runs: the stage-1 step with TI only, + L_emb, + L_attn, CoRe (both) and CoRe + pairwise
+ hinge; the stage-2 U-Net step; a 50-step guided DDIM chain. Tiny shapes (8x8 latents), batch 2,
random weights. With --scaling, CoRe with 1, 2, 4 and 8 concepts packed in one step.

Commands:
    core-jax bench --config configs/bench_tiny.py
    core-jax bench --config configs/bench_tiny.py --vs-torch --json

Time here (2-core CPU): about 2 minutes, nearly all of it compiling (about 10 s per variant).
What to expect: steps of a few milliseconds, dominated by per-op overheads, so the ratios between
variants say little about real shapes; use configs/bench_small.py for those.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "tiny"
    # JAX's compute dtype (parameters stay float32); "bfloat16" on accelerators. PyTorch's side
    # (--vs-torch) stays float32.
    c.dtype = "float32"
    # The U-Net's attention implementation and rematerialization, as a run's model.attention
    # and model.remat (core_jax.config): "auto" / "none" unless measuring them.
    c.attention = "auto"
    c.remat = "none"
    c.batch = 2  # rows per step (one concept)
    c.steps = 10  # timed steps per variant, after the first call and `warmup` more
    c.warmup = 1
    c.variants = "ti,emb,attn,core,core_all,unet,sample"
    # Peak TFLOP/s of one chip for MFU; 0: from core_jax.bench.peaks by the device's name
    # (none on CPUs).
    c.peak_tflops = 0.0
    c.torch_threads = 0  # 0: all cores, as JAX uses
    # `chains` whole 50-step chains are timed (each is 50 U-Net calls).
    c.sample = ml_collections.ConfigDict(dict(batch=1, num_inference_steps=50, chains=10))
    c.scaling = ml_collections.ConfigDict(
        dict(variant="core", concepts="1,2,4,8", batch_per_concept=1, steps=10)
    )
    return c

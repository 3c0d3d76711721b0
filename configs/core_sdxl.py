"""CoRe on SDXL: S* learns one vector per text encoder (768 + 1280 for SDXL base), the context
the U-Net reads is both encoders' penultimate states side by side, and every U-Net pass carries
SDXL's added conditioning (the pooled text embedding of the same prompt, add-time ids).

What it runs: CoRe stage 1 with the paper's numbers (300 steps, L_emb + L_attn every step, the
norm held over steps 120-180, AdamW 5e-3, batch 6) at 1024 px, then stage 2 (the whole U-Net,
AdamW 2e-6, batch 4) unless `--config.stage2.steps=0`, on your photos and a local diffusers
folder of SDXL base 1.0. Without a folder it runs `tiny_sdxl`'s random weights (SDXL's topology
at tiny widths, 64 px: the test of the machinery, not images). Our choices where nothing is
published for SDXL: L_emb compares the concatenated context (what the U-Net reads), L_attn
averages all the U-Net's cross-attention layers (70 in SDXL base), the norm hold and the hinge
act on the joined [D1 + D2] vector, and the add-time ids are those of an uncropped square at
data.resolution (the views are resized to it).

Command:
    core-jax train --config configs/core_sdxl.py --workdir runs/teapot-xl \\
        --config.model.path=/models/stable-diffusion-xl-base-1.0 \\
        --config.concept.images=photos/teapot --config.concept.super_category=teapot \\
        --config.concept.templates=inanimate

Time: with the tiny_sdxl preset here (2-core CPU, `--config.data.resolution=64
--config.stage1.steps=20 --config.stage2.steps=0`), about 10 minutes measured while other jobs
loaded the machine (load 8), most of it initialising and compiling; SDXL base's real shapes
need an accelerator (not measured: no device was lent).
What it should reach: every loss term finite and logged; exports learned_embeds.safetensors
([V, 2048] for our sampler) and a1111/<name>.safetensors with clip_l [V, 768] and clip_g
[V, 1280], which AUTOMATIC1111, ComfyUI and diffusers' load_textual_inversion (one call per
encoder) read; sample grids of S* in new contexts.
"""

from core_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny_sdxl"  # only used without --config.model.path (random weights)
    c.data.resolution = 1024
    c.concept.name = "concept"
    c.sample.steps = 30
    c.sample.guidance_scale = 5.0
    return c

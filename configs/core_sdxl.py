"""CoRe on SDXL: S* learns one vector per text encoder (768 + 1280 for SDXL base), the context
the U-Net reads is both encoders' penultimate states side by side, and every U-Net pass carries
SDXL's added conditioning (the pooled text embedding of the same prompt, add-time ids).

What it runs: CoRe stage 1 with the paper's numbers (300 steps, L_emb + L_attn every step, the
norm held over steps 120-180, AdamW 5e-3, batch 6) at 1024 px, then stage 2 (the whole U-Net,
AdamW 2e-6, batch 4) unless `--config.stage2.steps=0`, on your photos and a local diffusers
folder of SDXL base 1.0. Without a folder it runs `tiny_sdxl`'s random weights (SDXL's topology
at tiny widths, 64 px: the test of the machinery, not images).

Every row's add-time ids are its view's, recorded when the augmentation makes it, as SDXL
training does (diffusers' train_text_to_image_sdxl.py): the photo's original (height, width),
the crop's top-left (y, x) in the photo rotated, resized to data.resolution on its shorter side
and flipped, and the target (data.resolution, data.resolution). Sampling uses an uncropped
square (size, size, 0, 0, size, size), as SDXL inference does.

Our choices where nothing is published for SDXL, each a stage-1 key (defaults below):
- stage1.emb_encoders = "joined": L_emb compares the concatenated context [D1 + D2] (what the
  U-Net reads). "mean": the mean of L_emb on each encoder's part (CLIP ViT-L 768, OpenCLIP
  bigG 1280); "clip_l" / "clip_g": only that encoder's part.
- stage1.attn_layers = "all": L_attn averages all the U-Net's cross-attention layers (70 in SDXL
  base), as the paper does. Or a comma list of "down", "mid", "up", layer numbers 0-69 (U-Net
  order) and diffusers module paths, e.g. "mid,up" or "up_blocks_0/attentions_1".
The norm hold and the hinge act on the joined [D1 + D2] vector.

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
    c.stage1.emb_encoders = "joined"  # or "mean", "clip_l", "clip_g"
    c.stage1.attn_layers = "all"  # or e.g. "mid,up", "0,1,2", "up_blocks_0"
    c.sample.steps = 30
    c.sample.guidance_scale = 5.0
    return c

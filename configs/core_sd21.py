"""CoRe as the paper runs it: SD 2.1-base, 512 px, stage 1 (300 steps) then stage 2 (1000 steps).

What it runs: CoRe stage 1 (one vector from the super-category, L_emb + L_attn every step, the
norm held over steps 120-180, AdamW 5e-3, batch 6) then stage 2 (whole U-Net, AdamW 2e-6, batch
4), on your photos and a local diffusers folder of SD 2.1-base.

Command:
    core-jax train --config configs/core_sd21.py --workdir runs/teapot \\
        --config.model.path=/models/stable-diffusion-2-1-base \\
        --config.concept.images=photos/teapot --config.concept.super_category=teapot \\
        --config.concept.templates=inanimate

Time: stage 1 is ~3x a Textual Inversion step (three U-Net passes, two with backward); on one
H100 in bf16 expect minutes, on a 2-core CPU this is not practical (use configs/default.py).
What it should reach: the paper's Table 1 level of text alignment (CLIP-T ~0.257) with identity
(CLIP-I ~0.705, DINO ~0.584) averaged over its 24 concepts.

Loss variants: the paper's ("paper") by default. lambda_attn = 0.05 was tuned with the official
code's batch *sum* at batch 6; with the paper variant's batch mean the same lambda is 6x weaker.
Pass --config.stage1.attn_variant=code --config.stage1.emb_variant=code for the code's behaviour.
"""

from core_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "sd21"  # only used without --config.model.path (random weights)
    c.data.resolution = 512
    c.concept.name = "concept"
    return c

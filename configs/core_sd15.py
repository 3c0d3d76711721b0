"""CoRe with the paper's hyper-parameters on Stable Diffusion 1.5 (512 px).

What it runs: the same two stages as configs/core_sd21.py (DESIGN.md "CoRe, exactly"), on SD 1.5
weights from a local diffusers folder; the text encoder is CLIP ViT-L/14 (quick_gelu, 768 wide).

Command:
    core-jax train --config configs/core_sd15.py --workdir runs/dog \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog

Time: as core_sd21 (SD 1.5's U-Net is the same size); minutes on one modern GPU in bf16.
What it should reach: the concept in new contexts with the prompt's context kept; the paper
reports its numbers on SD 2.1-base, so expect the same direction, not the same values.
"""

from core_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "sd15"
    c.data.resolution = 512
    return c

"""Textual Inversion on Stable Diffusion 1.5: the baseline CoRe is measured against.

What it runs: stage 1 only, one vector initialised from the super-category, the diffusion loss
alone (no context regularizers, no norm hold), AdamW 5e-3, batch 6, 300 steps; no stage 2.

Command:
    core-jax train --config configs/ti_sd15.py --workdir runs/dog-ti \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog

Time: a third of a CoRe stage-1 step (one U-Net pass with backward per step).
What it should reach: good identity, weaker prompt following than CoRe (the paper's Table 1).
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "sd15"
    c.data.resolution = 512
    c.stage1 = stage_config(
        ("textual_inversion",), steps=c.stage1.steps, batch_size=c.stage1.batch_size,
        learning_rate=c.stage1.learning_rate, weight_decay=c.stage1.weight_decay,
    )
    c.stage2.steps = 0
    return c

"""NeTI on Stable Diffusion 1.5 (the code trains on SD v1.4; either works): the code's defaults.

What it runs: one stage of `("neti",)` (`core_jax/methods/neti.py`): the mapper of (timestep,
cross-attention layer) with nested dropout p 0.5 and the textual bypass, 1000 steps, batch 8
(the code's 2 x gradient accumulation 4: the same mean gradient per update), AdamW lr 8e-3 (the
code's 1e-3 with scale_lr x 8 images), betas (0.9, 0.999), weight decay 1e-2, constant
schedule, uniform timesteps, diffusion loss only (NeuralTextualInversion/NeTI,
training/config.py and input_configs/train.yaml). The super-category must be one token (its
embedding's norm sets the mapper's output norm).

Command:
    core-jax train --config configs/neti_sd15.py --workdir runs/dog-neti \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog
    core-jax sample --workdir runs/dog-neti --prompt "a S* in the jungle"

Time: per step one U-Net pass with backward over 8 rows plus 8 x 16 text-encoder passes (each
row's timestep has its own vectors at each layer); not measured (no SD 1.5 weights here).
What it should reach: neti_mapper.safetensors (what `core-jax sample` draws with); per the
CoRe paper's table (24 concepts) NeTI's CLIP-T .2386, CLIP-I .7104, DINO .5623.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.neti import BATCH_SIZE, LEARNING_RATE, STEPS


def get_config():
    c = base_config()
    c.model.preset = "sd15"
    c.data.resolution = 512
    c.stage1 = stage_config(
        ("neti",), steps=STEPS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
        weight_decay=1e-2,
    )
    c.stage2.steps = 0
    return c

"""XTI (Extended Textual Inversion, P+, arXiv 2303.09522) on Stable Diffusion 1.5: S* gets its
own vector for each of the 16 cross-attention layers, trained with the diffusion loss.

What it runs: stage 1 only, `("xti",)` (`core_jax/methods/xti.py`): 16 x 1 vectors, each
initialised from the super-category's embedding, caption "a photo of a S*", AdamW 5e-3 (weight
decay 1e-2, constant), batch 6, 500 steps; no stage 2. The text encoder runs once per layer
(16 x TI's text cost, small beside the U-Net's). [UNVERIFIED] learning rate and steps: the
paper's were not found; 5e-3 and 500 steps are two reimplementations' (mkshing/prompt-plus-
pytorch, which cites the paper's section 4.2.2 for the steps, and SeongMon/prompt-plus), TI's
learning rate and a tenth of TI's 5000 steps; the method's docstring lists what was searched.

Command:
    core-jax train --config configs/xti_sd15.py --workdir runs/dog-xti \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog
    core-jax sample --workdir runs/dog-xti --prompt "a S* in the jungle"

Time: per step about TI's (1 U-Net pass with backward) plus 16 text-encoder passes; not
measured (no SD 1.5 weights on this machine).
What it should reach: xti_embeds.safetensors (16 layers' vectors, diffusers module names; what
`core-jax sample` draws with), learned_embeds.safetensors holding their mean (a single-vector
stand-in); per the paper, reconstruction at least TI's in fewer steps, editability like TI's.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.xti import LEARNING_RATE, STEPS


def get_config():
    c = base_config()
    c.model.preset = "sd15"
    c.data.resolution = 512
    c.stage1 = stage_config(
        ("xti",), steps=STEPS, batch_size=6, learning_rate=LEARNING_RATE, weight_decay=1e-2,
    )
    c.stage2.steps = 0
    return c

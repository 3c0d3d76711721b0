"""TextBoost with the official code's recipe on Stable Diffusion 1.5 (512 px).

What it runs: one stage of `("textual_inversion", "textboost")` on SD 1.5 weights from a local
diffusers folder: the S* vector and rank-4 LoRA adapters on the text encoder's q/k/v
projections train, the U-Net stays frozen, with the knowledge-preservation loss on drawn prior
prompts (`core_jax/methods/textboost.py`). The numbers are `run_textboost_db.py` /
`train_textboost.py` of github.com/nahyeonkaty/textboost (METHODS.md section 3): 250 steps at
batch 8, S* at lr 1e-3, the adapters at 1e-4, AdamW weight decay 1e-2, gradient clipping 1.0
(the code clips the text encoder's gradient; here each run's whole gradient, S* included),
`--kpl_weight 0.1`. Timesteps: `timestep_sampling="uniform"`, what the released script runs
(its `--disable_weighted_sample` defaults to True); set "snr_weighted" for the paper's
SNR-weighted sampling (p_t proportional to max log SNR - log SNR(t), the code's formula).
Sampling (grids, `core-jax sample`) keeps guidance's unconditional branch at the frozen encoder,
as the code's null embedding. The code's augmentation tokens are built in the data layer but
not yet used in training: this run trains on CoRe's augmentation with the plain caption (the
method's docstring lists what differs).

Command:
    core-jax train --config configs/textboost_sd15.py --workdir runs/dog \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog

Time: not measured (SD 1.5 at 512 px does not fit this CPU); the code reports training on one
A6000. Each step adds a text-encoder pass of 8 prior prompts per run (small next to the U-Net).
What it should reach: the concept in new contexts, the prompt's other words kept (the paper's
claim: text alignment above DreamBooth's at similar identity).
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "sd15"
    c.data.resolution = 512
    c.stage1 = stage_config(
        ("textual_inversion", "textboost"), steps=250, batch_size=8, learning_rate=1e-3,
        text_lora_learning_rate=1e-4, weight_decay=1e-2, clip_norm=1.0, lambda_kp=0.1,
        timestep_sampling="uniform",  # the code's; "snr_weighted": the paper's
    )
    c.stage2.steps = 0
    return c

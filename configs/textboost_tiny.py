"""TextBoost: S* and LoRA adapters on the text encoder's attention, with knowledge
preservation, on a tiny random-weight model, to show the machinery runs here.

What it runs: the tiny preset (SD 1.x topology, random weights), scikit-image's photo of
Chelsea the cat as the concept "cat", one stage of `("textual_inversion", "textboost")`: S* and
rank-4 adapters on the q/k/v projections of both text-encoder layers (6 adapters, 1,536
numbers) train (`core_jax/methods/textboost.py`), the U-Net frozen; each row also draws a
prior prompt (a general caption, "a photo of a cat"-style template, or "") whose adapted
encoding is held to the frozen encoder's by 1 - cos over all 77 tokens, weight 0.1.
Timesteps are drawn by the paper's SNR-weighted sampling (`timestep_sampling="snr_weighted"`,
p_t proportional to max log SNR - log SNR(t)) so this run exercises it; the released code, and
configs/textboost_sd15.py, draw them uniformly. The grids' unconditional branch is the frozen
encoder's (the code's null embedding). configs/textboost_sd15.py holds the official recipe;
here the steps are fewer and the adapters' learning rate higher so random weights visibly move.
Nothing is downloaded.

Command:
    core-jax train --config configs/textboost_tiny.py --workdir runs/textboost_tiny

Time here (2-core CPU): measured 5:18 wall (1:56 CPU) once, on a machine loaded by other jobs;
most of it compiling the step and the grid sampler.
What it should reach: `diffusion` and `kp` logged and finite; `kp` 0 at the first step (the
adapters start at B = 0) and growing as the adapters move (measured: 0.010 at step 10, 0.070
at step 40); pytorch_lora_weights.safetensors
with the text encoder's adapters under diffusers' `text_encoder.` names,
learned_embeds.safetensors, sample grids drawn through the adapted encoder. With random weights
the pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.concept.name = "chelsea"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.concept.templates = "animate"
    c.data.resolution = 64
    c.data.num_views = 32
    c.stage1 = stage_config(
        ("textual_inversion", "textboost"), steps=40, batch_size=2, learning_rate=1e-3,
        text_lora_learning_rate=1e-3, weight_decay=1e-2, clip_norm=1.0, lambda_kp=0.1,
        timestep_sampling="snr_weighted",  # the paper's; the code runs "uniform"
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {}", "a {} in the jungle")
    c.checkpoint_every = 20
    return c

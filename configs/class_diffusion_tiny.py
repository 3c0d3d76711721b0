"""ClassDiffusion: Custom Diffusion's K/V and S* trained with the semantic preservation loss,
on a tiny random-weight model, to show the machinery runs here.

What it runs: the tiny preset (SD 1.x topology: 16 cross-attention layers, random weights),
scikit-image's photo of Chelsea the cat as the concept "cat", one stage of
`("custom_diffusion", "class_diffusion")`: the 32 to_k/to_v kernels and the S* vector train at
one learning rate on "a photo of a S* cat" (zoom views, loss on the object region), plus
lambda_spl times 1 - cos between the pooled text features of "a photo of a S* cat" and "a
photo of a cat" (`core_jax/methods/class_diffusion.py`). configs/class_diffusion_sd15.py holds
the official recipe; here the steps are fewer and the learning rate higher so random weights
visibly move. Nothing is downloaded.

Command:
    core-jax train --config configs/class_diffusion_tiny.py --workdir runs/class_diffusion_tiny

Time here (2-core CPU): measured 2:31 wall with the compile cache warm, on a machine loaded by
other jobs; most of it compiling the step and the grid sampler (training ~8 steps/s once
compiled).
What it should reach: both terms logged and finite, `diffusion` on the object regions and
`spl` (the semantic loss) falling while S* trains (measured: 0.041 at step 10, 0.014 at step
40); pytorch_custom_diffusion_weights.bin / .safetensors with the K/V,
learned_embeds.safetensors, sample grids. With random weights the pictures are noise: this
run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.concept.name = "chelsea"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.concept.templates = "animate"
    c.concept.caption = "a photo of a {} {cls}"
    c.data.resolution = 64
    c.data.num_views = 32
    c.data.augmentation = "custom_diffusion"
    c.data.flip_p = 0.5
    c.stage1 = stage_config(
        ("custom_diffusion", "class_diffusion"), steps=40, batch_size=2, learning_rate=1e-3,
        weight_decay=1e-2, lambda_spl=1.0,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {} {cls}", "a {} {cls} in the jungle")
    c.checkpoint_every = 20
    return c

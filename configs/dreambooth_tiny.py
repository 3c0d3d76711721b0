"""DreamBooth with prior preservation: the whole U-Net fine-tuned on "a photo of a S* cat",
with the prior-preservation loss on cat images the frozen model generated itself.

What it runs: the tiny preset (SD 1.x topology, random weights), scikit-image's photo of Chelsea
the cat as the concept "cat", one stage of `("unet_finetune", "prior_preservation")` (DreamBooth
is these two methods in one stage: `core_jax/methods/unet_finetune.py`, `prior.py`). Before
training, the frozen model generates `num_class_images` images of "a photo of a cat" (one jitted
sampler, 8 at a time), the VAE encodes them into a class pool, cached in
`<workdir>/class_pools/` and reused by a rerun; each step then takes as many class rows as photo
rows, in the same U-Net call. S* stays at its first value (here the super-category's embedding;
`--config.concept.init_word=sks` starts it at the rare token "sks", as configs/dreambooth_sd15.py
does), as DreamBooth's identifier stays fixed; adding "textual_inversion" to the stage's methods
is the learned-S* variant. The numbers are shrunk from the paper's (lr 5e-6, 1000 steps, 200 class
images, lambda 1) to run here;
the learning rate is raised from 5e-6 so that random weights visibly move in 40 steps.
Nothing is downloaded.

Command:
    core-jax train --config configs/dreambooth_tiny.py --workdir runs/dreambooth_tiny

Time here (2-core CPU, shared): measured 4:54 wall once, most of it compiling the step, the
sampler and the grids (training itself ~3 steps/s once compiled).
What it should reach: both terms, `diffusion` and `prior`, finite and logged (measured at step
40: diffusion 0.83, prior 0.77, loss 1.60); class_pools/<key>.npz, .json and .png (the 16 class
images); learned_embeds.safetensors, the A1111 embedding, the fine-tuned U-Net as a diffusers
folder (unet/), sample grids of "a photo of a S* cat" etc., checkpoints. With random weights the
pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.concept.name = "chelsea"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.concept.templates = "animate"
    c.concept.caption = "a photo of a {} {cls}"  # DreamBooth's "a [V] [class noun]"
    c.data.resolution = 64
    c.data.num_views = 32
    c.stage1 = stage_config(
        ("unet_finetune", "prior_preservation"), steps=40, batch_size=2, learning_rate=1e-4,
        weight_decay=1e-2, lambda_prior=1.0, num_class_images=16, class_steps=10,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {} {cls}", "a {} {cls} in the jungle")
    c.checkpoint_every = 20
    return c

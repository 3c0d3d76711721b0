"""Custom Diffusion: the U-Net's cross-attention keys and values and S* trained together, with
prior preservation, the zoom augmentation and the loss on the object region only.

What it runs: the tiny preset (SD 1.x topology: 16 cross-attention layers, random weights),
scikit-image's photo of Chelsea the cat as the concept "cat", one stage of
`("custom_diffusion", "prior_preservation")` (`core_jax/methods/custom_diffusion.py`, `prior.py`):
the 32 to_k/to_v kernels of the cross-attention layers and the S* vector train at one learning
rate over the shared frozen U-Net, on "a photo of a S* cat"; the views are Custom Diffusion's
zoom in/out with object masks (`data.augmentation = "custom_diffusion"`, flip p 0.5); before
training the frozen model generates `num_class_images` images of "a photo of a cat" once
(cached in `<workdir>/class_pools/`) and each step denoises as many of them as photos.
lambda_prior = 0.25 is the official code's prior weight 1 at our loss scale (the method's
docstring says why). The numbers are shrunk from configs/custom_diffusion_sd15.py's (the
paper's) to run here, and the learning rate raised from the code's 1e-5 x images (4e-5 here) so
that random weights visibly move in 40 steps. Nothing is downloaded.

Command:
    core-jax train --config configs/custom_diffusion_tiny.py --workdir runs/custom_diffusion_tiny

Time here (2-core CPU, shared): TIME_TBD
What it should reach: RESULT_TBD
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
    c.data.flip_p = 0.5  # the code's --hflip
    c.stage1 = stage_config(
        ("custom_diffusion", "prior_preservation"), steps=40, batch_size=2, learning_rate=1e-3,
        weight_decay=1e-2, lambda_prior=0.25, num_class_images=16, class_steps=10,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {} {cls}", "a {} {cls} in the jungle")
    c.checkpoint_every = 20
    return c

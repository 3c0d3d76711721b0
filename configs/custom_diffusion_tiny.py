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

Time here (2-core CPU): measured 5:48 wall (3:10 CPU) once, on a machine loaded by other jobs;
most of it compiling the step, the class-image sampler and the grid sampler (training itself
~6 steps/s once compiled).
What it should reach: both terms, `diffusion` (on the object regions) and `prior`, finite and
logged (measured at step 40: diffusion 1.31, prior 1.14, loss 1.60 = diffusion + 0.25 prior);
class_pools/<key>.npz, .json and .png (the 16 class images); pytorch_custom_diffusion_weights.bin
(diffusers: `pipe.unet.load_attn_procs(workdir, weight_name=..., _pipeline=pipe)`) and .safetensors
holding the 32 K/V kernels (45k numbers; measured 5.5 % relative L2 away from the frozen ones),
learned_embeds.safetensors and the A1111 embedding, sample grids with the K/V merged,
checkpoints whose state holds the vectors and the K/V only. With random weights the pictures
are noise: this run proves the machinery, not the method.
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

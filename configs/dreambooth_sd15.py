"""DreamBooth with prior preservation on Stable Diffusion 1.5 (512 px), with the paper's numbers.

What it runs: one stage of `("unet_finetune", "prior_preservation")` (`core_jax/methods/
unet_finetune.py`, `prior.py`): the whole U-Net fine-tuned on "a photo of a S* <class>" with
the prior-preservation loss, on a local diffusers folder of SD 1.5. Before training, the frozen
model generates 200 images of "a photo of a <class>" (DDIM, 50 steps, guidance 7.5, 8 per
jitted call), the VAE encodes them into the class pool, cached in `<workdir>/class_pools/`
(point `stage1.class_pool_dir` at a shared folder to reuse it across runs; a sweep's runs
share theirs). S* is the paper's rare-token identifier: it starts at the embedding of "sks"
(`concept.init_word`, the identifier diffusers' DreamBooth examples use) and stays there, the
text encoder frozen, so the caption is exactly "a photo of a sks dog". Add "textual_inversion"
to `stage1.methods` for the learned-S* variant, and set `concept.init_word=""` to start S* at
the class word instead.

Where the numbers come from (shared/METHODS.md §5, §7):
- lr 5e-6, ~1000 steps, lambda_prior = 1: DreamBooth (Ruiz et al. 2022, arXiv 2208.12242 §3.3,
  "~1000 iterations with lambda = 1 and learning rate 5e-6 for Stable Diffusion").
- 200 class images, batch 1 (one photo row plus one class row per step), a constant lr,
  AdamW with weight decay 1e-2 and gradient clipping at 1.0: diffusers'
  examples/dreambooth (README's prior-preservation command, `train_dreambooth.py` defaults).
  The paper generates ~1000 class images for Imagen; 200 is what SD is trained with there.
- No rotation or flip (CoRe's augmentation is off): DreamBooth trains on resized, cropped
  photos.

Command:
    core-jax train --config configs/dreambooth_sd15.py --workdir runs/dog-dreambooth \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.concept.images=photos/dog --config.concept.super_category=dog

Time (an estimate, not measured here): on one A100/H100-class accelerator in bfloat16
(`--config.model.dtype=bfloat16`), about 5 minutes for the 200 class images (25 sampler calls
of 8 images x 50 guided steps) and about 5 minutes for the 1000 steps (the paper's figure for
its training on an A100), plus compilation: 10-15 minutes the first time, 5-10 once the pool
is cached. On a 2-core CPU this is not practical: configs/dreambooth_tiny.py shows the
machinery there.
What it should reach: the concept in new contexts from "a photo of a S* dog" prompts with
"a photo of a dog" still drawing varied dogs; the paper reports DINO 0.668, CLIP-I 0.803,
CLIP-T 0.305 for DreamBooth on SD (its Table 1, DreamBench).
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "sd15"  # only used without --config.model.path (random weights)
    c.data.resolution = 512
    c.data.rotate_p = 0.0
    c.data.flip_p = 0.0
    c.concept.caption = "a photo of a {} {cls}"  # the paper's "a [V] [class noun]"
    c.concept.init_word = "sks"  # a rare token as [V]: the paper's rare-token identifiers (§3)
    c.stage1 = stage_config(
        ("unet_finetune", "prior_preservation"), steps=1000, batch_size=1, learning_rate=5e-6,
        weight_decay=1e-2, clip_norm=1.0, lambda_prior=1.0, num_class_images=200,
        class_prompt="a photo of a {}", class_steps=50, class_guidance_scale=7.5,
    )
    c.stage2.steps = 0
    c.sample.prompts = (
        "a photo of a {} {cls}",
        "a {} {cls} in the jungle",
        "a {} {cls} in the snow, watercolor",
        "a {} {cls} on the beach, oil painting",
    )
    c.checkpoint_every = 250
    return c

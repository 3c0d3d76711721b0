"""AttnDreamBooth as its official code runs it: SD 2.1-base, 512 px, three stages.

What it runs (`core_jax/methods/attn_dreambooth.py`; METHODS.md section 4; the numbers are
`bash_script/train_attndreambooth.sh` of github.com/lyuPang/AttnDreamBooth, "set according to
the official paper"), every stage on "a photo of a S* <cls>", batch 8, AdamW (0.9, 0.999, weight
decay 1e-2), constant lr, CoRe's augmentation (rotation <= 45 deg p 0.75, flip p 0.25, random
crop: the code's), with the attention mean/var regularizer on the diffusion pass:
1. textual inversion: S* from the super-category's embedding, lr 1e-3, 60 steps, weights mean
   0.1, var 0;
2. the cross-attention layers: to_q, to_k, to_v, to_out (kernels and biases) of all 16 attn2
   layers (the code unfreezes all of attn2, not only K/V), S* frozen, lr 2e-5, 100 steps,
   weights mean 2, var 5;
3. the whole U-Net from stage 2's weights, S* frozen, lr 2e-6, 500 steps, weights mean 2, var 5.
The regularizer sums over the batch as the code does (its weights were tuned that way).
The code's fast variant: --config.stage3.learning_rate=1e-5 --config.stage3.steps=200
--config.stage3.batch_size=4.

Command:
    core-jax train --config configs/attn_dreambooth_sd21.py --workdir runs/teapot \\
        --config.model.path=/models/stable-diffusion-2-1-base \\
        --config.concept.images=photos/teapot --config.concept.super_category=teapot

Time: not measured (SD 2.1 at 512 px does not fit this CPU); the README reports ~20 minutes per
concept on average (fast variant ~6), GPU not stated.
What it should reach: CoRe's Table 1 reports AttnDreamBooth at CLIP-T 0.2547, CLIP-I 0.6918,
DINO 0.5641 over its 24 concepts (METHODS.md section 1). Exports: learned_embeds.safetensors
(and the A1111 file) and the stage-3 U-Net as a diffusers folder (unet/); the code samples
with "A photo of a {}" where {} is "S* <cls>", 50 steps (its inference.py).
"""

from core_jax.config import base_config, stage_config


def get_config():
    c = base_config()
    c.model.preset = "sd21"  # only used without --config.model.path (random weights)
    c.data.resolution = 512
    c.concept.caption = "a photo of a {} {cls}"  # the code's --instance_prompt
    common = dict(batch_size=8, weight_decay=1e-2)
    c.stage1 = stage_config(
        ("textual_inversion", "attn_dreambooth"), steps=60, learning_rate=1e-3,
        lambda_attn_mean=0.1, lambda_attn_var=0.0, **common,
    )
    c.stage2 = stage_config(
        ("cross_attention_finetune", "attn_dreambooth"), steps=100, learning_rate=2e-5,
        lambda_attn_mean=2.0, lambda_attn_var=5.0, **common,
    )
    c.stage3 = stage_config(
        ("unet_finetune", "attn_dreambooth"), steps=500, learning_rate=2e-6,
        lambda_attn_mean=2.0, lambda_attn_var=5.0, **common,
    )
    c.sample.prompts = (
        "a photo of a {} {cls}",
        "a {} {cls} in the jungle",
        "a {} {cls} in the snow, watercolor",
        "a {} {cls} on the beach, oil painting",
    )
    return c

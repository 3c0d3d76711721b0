"""AttnDreamBooth's three stages on the tiny preset: textual inversion, the cross-attention
layers, then the whole U-Net, each with the attention mean/var regularizer.

What it runs: the tiny preset (SD 1.x topology: 16 cross-attention layers, random weights),
scikit-image's photo of Chelsea the cat as the concept "cat", on "a photo of a S* cat"
(`core_jax/methods/attn_dreambooth.py`): stage 1 `("textual_inversion", "attn_dreambooth")`
trains S* (weights mean 0.1, var 0: the variance term is absent); stage 2
`("cross_attention_finetune", "attn_dreambooth")` trains to_q, to_k, to_v, to_out (kernels and
biases) of every attn2 layer with S* frozen (mean 2, var 5); stage 3 `("unet_finetune",
"attn_dreambooth")` trains each run's U-Net copy, which starts from the frozen U-Net with stage
2's projections merged (mean 2, var 5). The regularizer compares, on the diffusion pass itself,
each layer's mean and variance of S*'s attention with those of the token after it ("cat").
The steps and batch are shrunk from configs/attn_dreambooth_sd21.py's (the code's: 60 / 100 /
500 steps at batch 8) and the learning rates raised (1e-3 / 2e-5 / 2e-6 there) so that random
weights visibly move in 20 steps a stage. Nothing is downloaded.

Command:
    core-jax train --config configs/attn_dreambooth_tiny.py --workdir runs/attn_dreambooth_tiny

Time here (2-core CPU, shared): measured 9:39 wall (4:29 CPU) once, with a test job running
beside it; most of it compiling (164 programs, 407 s in XLA: three stage steps, the grid
sampler), training itself ~3-10 steps/s once compiled.
What it should reach: the terms `diffusion` and `attn_mean` in every stage, `attn_var` in
stages 2 and 3, finite and logged (measured at step 60: diffusion 0.933, attn_mean 3.4e-5,
attn_var 4.9e-8: random weights attend almost uniformly, so S* and "cat" start alike);
learned_embeds.safetensors, the A1111 embedding, the stage-3 U-Net as a diffusers folder (unet/;
measured 1.6 % relative L2 from the frozen U-Net, 4.3 % on the attn2 weights, which stages 2
and 3 both train), sample grids at each stage's end, checkpoints (stage 2's hold S* and the
projections, stage 3's S* and the U-Net). With random weights the pictures are noise: this run
proves the machinery, not the method.
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
    common = dict(steps=20, batch_size=2, weight_decay=1e-2)
    c.stage1 = stage_config(
        ("textual_inversion", "attn_dreambooth"), learning_rate=5e-3, lambda_attn_mean=0.1,
        lambda_attn_var=0.0, **common,
    )
    c.stage2 = stage_config(
        ("cross_attention_finetune", "attn_dreambooth"), learning_rate=1e-3,
        lambda_attn_mean=2.0, lambda_attn_var=5.0, **common,
    )
    c.stage3 = stage_config(
        ("unet_finetune", "attn_dreambooth"), learning_rate=1e-4, lambda_attn_mean=2.0,
        lambda_attn_var=5.0, **common,
    )
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {} {cls}", "a {} {cls} in the jungle")
    c.checkpoint_every = 20
    return c

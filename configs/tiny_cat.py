"""The machinery on a real photo: full CoRe (stage 1 + stage 2), tiny random models, CPU.

What it runs: the tiny preset (SD 1.x topology, 16 cross-attention layers, random weights),
the real CLIP tokenizer (shipped), scikit-image's photo of Chelsea the cat as the concept "cat",
CoRe stage 1 (L_emb + L_attn, the 120-180 norm hold) then stage 2 (U-Net fine-tune). Nothing is
downloaded.

Command:
    core-jax train --config configs/tiny_cat.py --workdir runs/tiny_cat

Time here (2-core CPU): about 3-4 minutes, most of it compiling.
What it should reach: every loss term finite and logged; learned_embeds.safetensors, an A1111
embedding, the stage-2 U-Net folder, sample grids, loss curves and checkpoints in the workdir.
With random weights the pictures are noise: this run proves the machinery (a real photo, the
SD 1.x topology and its 64-pixel VAE path), not the method; configs/default.py shows the method
on the toy world's pretrained model. The tests' end-to-end runs use this config.
"""

from core_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.concept.name = "chelsea"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.concept.templates = "animate"
    c.data.resolution = 64
    c.data.num_views = 32
    c.stage1.steps = 200
    c.stage1.rescale_start = 80
    c.stage1.rescale_end = 120
    c.stage2.steps = 50
    c.stage2.learning_rate = 1e-4
    c.sample.steps = 20
    c.sample.every = 100
    c.checkpoint_every = 50
    return c

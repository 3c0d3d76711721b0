"""CoRe with a LoRA stage 2: the embedding stage, then rank-4 adapters instead of the U-Net.

What it runs: the tiny preset (SD 1.x topology, random weights), scikit-image's photo of Chelsea
the cat as the concept "cat", CoRe stage 1 (L_emb + L_attn, the norm hold), then stage 2 as
LoRA (`core_jax/methods/lora.py`): rank 4, alpha 4 on every attention layer's to_q, to_k, to_v,
to_out.0, S* frozen, the frozen U-Net shared. The switch is one line,
`c.stage2 = stage_config(("lora",), ...)` instead of base_config's ("unet_finetune",); add
`lora.FEED_FORWARD` to `lora_targets` to adapt the feed-forward layers too. Nothing is
downloaded.

Command:
    core-jax train --config configs/lora_tiny.py --workdir runs/lora_tiny

Time here (2-core CPU): about 3 minutes, most of it compiling.
What it should reach: every loss term finite and logged; learned_embeds.safetensors, the A1111
embedding, pytorch_lora_weights.safetensors (diffusers: `pipe.load_lora_weights(workdir)`),
a1111/lora/chelsea.safetensors (kohya names: AUTOMATIC1111, ComfyUI), sample grids with the
adapters merged, checkpoints whose stage-2 state holds the vectors and the adapters only (170
kB of adapters here, 3.2 MB at rank 4 for SD 1.5's shapes, against 3.4 GB for a U-Net copy).
With random weights the pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.lora import ATTENTION


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.concept.name = "chelsea"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.concept.templates = "animate"
    c.data.resolution = 64
    c.data.num_views = 32
    c.stage1.steps = 100
    c.stage1.rescale_start = 40
    c.stage1.rescale_end = 60
    # LoRA's learning rate is the one diffusers' DreamBooth-LoRA example trains with.
    c.stage2 = stage_config(
        ("lora",), steps=100, batch_size=4, learning_rate=1e-4, weight_decay=1e-2,
        lora_rank=4, lora_alpha=4.0, lora_targets=ATTENTION,
    )
    c.sample.steps = 20
    c.checkpoint_every = 50
    return c

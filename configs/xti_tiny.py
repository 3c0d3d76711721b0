"""XTI (P+): one vector of S* per cross-attention layer, on the tiny preset.

What it runs: the tiny preset (SD 1.x topology: 16 cross-attention layers, random weights),
scikit-image's photo of Chelsea the cat as the concept "cat", one stage of `("xti",)`
(`core_jax/methods/xti.py`): 16 vectors, each starting at "cat"'s embedding, trained with the
diffusion loss on "a photo of a S*"; the text encoder runs once per layer (batched) and layer k
of the U-Net reads encoding k. Learning rate 5e-3 as configs/xti_sd15.py; 60 steps instead of
500 to run here. Nothing is downloaded.

To compare XTI with CoRe in one sweep (XTI refuses to share a stage with CoRe), give each its
own named setting; each method set is one group, compiled once:
    c.sweep.settings = (
        dict(name="xti", overrides={"stage1.methods": ("xti",), "stage1.lambda_emb": 0.0,
                                    "stage1.lambda_attn": 0.0, "stage1.lambda_pairwise": 0.0,
                                    "stage1.lambda_hinge": 0.0, "stage1.rescale_end": 0}),
        dict(name="core", overrides={}),
    )
(tests/test_xti.py runs such a sweep).

Command:
    core-jax train --config configs/xti_tiny.py --workdir runs/xti_tiny
    core-jax sample --workdir runs/xti_tiny --prompt "a S* in the jungle"

Time here (2-core CPU): measured 3:25 wall (2:07 CPU) once, on a machine loaded by other jobs:
1:20 to the last step, nearly all of it compiling (~7 steps/s once compiled), then the grid.
What it should reach: the diffusion term finite and logged (measured at step 60: diffusion
1.39, grad_norm 0.37); xti_embeds.safetensors with 16 layers' vectors (diffusers module names
"down_blocks.0.attentions.0.transformer_blocks.0.attn2", ...; placeholder in the metadata),
all different (measured: each 1.8-3.4 x the norm of their mean away from it);
learned_embeds.safetensors and the A1111 file holding their mean; a sample grid drawn with the
per-layer vectors; checkpoints whose state holds the vectors (and "embeds", their mean) only.
With random weights the pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.xti import LEARNING_RATE


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
        ("xti",), steps=60, batch_size=2, learning_rate=LEARNING_RATE, weight_decay=1e-2,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.checkpoint_every = 30
    return c

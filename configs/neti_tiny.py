"""NeTI: a mapper (timestep, cross-attention layer) -> S*'s vector, on the tiny preset.

What it runs: the tiny preset (SD 1.x topology: 16 cross-attention layers, random weights),
scikit-image's photo of Chelsea the cat as the concept "cat", one stage of `("neti",)`
(`core_jax/methods/neti.py`): the mapper (positional encoding of (t, l) -> 160 anchors -> 128
-> 128 -> S*'s vector and the textual bypass, output at the norm of "cat"'s embedding, nested
dropout p 0.5) trained with the diffusion loss on "a photo of a S*"; each row's caption is
encoded once per layer with the vectors of its own timestep (2 rows x 16 layers per step), and
the U-Net's layer k reads encoding k for its keys and the bypassed one for its values. The
code's AdamW (lr 1e-3 x 8 images per update = 8e-3, weight decay 1e-2); batch 2 and 60 steps
instead of the code's 8 and 1000 to run here. Nothing is downloaded.

NeTI refuses to share a stage with CoRe (its terms read S*'s one vector); to compare them in
one sweep give each its own named setting, as configs/xti_tiny.py shows for XTI, with NeTI's
keys added to the base stage (`c.stage1.update(core_jax.methods.neti.DEFAULTS)`; the CoRe runs
ignore them). tests/test_xti.py runs such a sweep of XTI, NeTI and CoRe.

Command:
    core-jax train --config configs/neti_tiny.py --workdir runs/neti_tiny
    core-jax sample --workdir runs/neti_tiny --prompt "a S* in the jungle"

Time here (2-core CPU): measured 10:09 wall (2:34 CPU) once, under load (load average ~10 from
other jobs): 5:52 to the last step, nearly all of it compiling (~2.5 steps/s once compiled),
then the sample grid (the mapper evaluated at each of its 20 steps) and the exports.
What it should reach: the diffusion term finite and logged (measured at step 60: diffusion
1.42, grad_norm 0.11); neti_mapper.safetensors (the
mapper's weights and constants; the layers and the rebuild config in its metadata), which
`core-jax sample` evaluates at each sampling step's timestep; learned_embeds.safetensors
holding "cat"'s embedding (NeTI's code saves the untrained token row too); a sample grid drawn
with the mapper; checkpoints whose state holds the mapper (and the untouched "embeds").
With random weights the pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.neti import LEARNING_RATE


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
        ("neti",), steps=60, batch_size=2, learning_rate=LEARNING_RATE, weight_decay=1e-2,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.checkpoint_every = 30
    return c

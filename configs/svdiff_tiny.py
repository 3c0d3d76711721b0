"""CoRe with an SVDiff stage 2: the embedding stage, then spectral shifts of the U-Net.

What it runs: the tiny preset (SD 1.x topology, random weights), scikit-image's photo of Chelsea
the cat as the concept "cat", CoRe stage 1 (L_emb + L_attn, the norm hold), then stage 2 as
SVDiff (`core_jax/methods/svdiff.py`): every U-Net weight matrix (linear kernels, conv kernels
reshaped) decomposed once, W = U diag(sigma) V^T, and one shift delta per matrix trained,
W_delta = U diag(ReLU(sigma + delta)) V^T, S* frozen, the frozen U-Net and its factors shared.
The learning rate of the shifts, 1e-3, is the paper's (arXiv 2303.11305) and
mkshing/svdiff-pytorch's README's. Nothing is downloaded.

Command:
    core-jax train --config configs/svdiff_tiny.py --workdir runs/svdiff_tiny

Time here (2-core CPU): about 4 minutes, most of it compiling (measured 4:01 wall, 2.1 GB
peak memory; once compiled both stages step at ~4 steps/s).
What it should reach: every loss term finite and logged (measured: stage-2 diffusion loss 1.34
at its first logged step, 1.02 at the last); learned_embeds.safetensors, the A1111 embedding,
spectral_shifts.safetensors (12,420 shifts of 281 weight matrices, 81 kB of which 50 kB numbers:
one float32 vector per matrix named `<diffusers module>.delta`; the largest |delta| was 0.098),
unet/ (the merged U-Net, a diffusers folder), sample grids with the shifts merged, checkpoints
whose stage-2 state holds the vectors and the shifts only (0.22 M shifts, 0.89 MB, for SD 1.5's
shapes against 3.4 GB for a U-Net copy). With random weights the pictures are noise: this run
proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config
from core_jax.methods.svdiff import LEARNING_RATE


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
    c.stage2 = stage_config(
        ("svdiff",), steps=100, batch_size=4, learning_rate=LEARNING_RATE, weight_decay=1e-2,
    )
    c.sample.steps = 20
    c.checkpoint_every = 50
    return c

"""DreamBench on SD 1.5: CoRe against Textual Inversion, 30 subjects x 25 prompts x 4 images.

What it runs: configs/dreambench_sd21.py's benchmark (the same subjects, prompts, methods at the
paper's settings, sampling, scores and tables) on SD 1.5 (CLIP ViT-L/14 text encoder, 768 wide),
the base most other personalization papers (Textual Inversion, DreamBooth, Custom Diffusion,
NeTI) report on. "ti": Textual Inversion at CoRe's stage-1 settings (300 steps, batch 6, AdamW
5e-3, no stage 2); "core": CoRe's two stages (stage 1 with L_emb 1.5e-4, L_attn 0.05 and the
norm hold, then the whole U-Net for 1000 steps at 2e-6).

Models: CORE_JAX_SD15_PATH (model.path, a diffusers SD 1.5 folder), CORE_JAX_DREAMBENCH_ROOT
(dreambench.root, google/dreambooth's dataset/), CORE_JAX_CLIP_PATH and CORE_JAX_DINO_PATH
(dreambench.clip / dreambench.dino, transformers folders), or the --config fields.

Command:
    core-jax dreambench --config configs/dreambench_sd15.py --workdir runs/dreambench_sd15 \\
        --config.model.path=/models/stable-diffusion-v1-5 \\
        --config.dreambench.root=/data/dreambooth/dataset \\
        --config.dreambench.clip=/models/clip-vit-large-patch14 \\
        --config.dreambench.dino=/models/dino-vits16 --config.model.dtype=bfloat16
    # CoRe's variant of CLIP-I / DINO (outfit prompts left out): configs/dreambench_sd15.py:core

Time: about 1.5 minutes per subject for both methods on one H100 in bf16, as for
dreambench_sd21.py (an estimate from XLA's FLOP counts, not measured: SD 1.5's U-Net does the
same work per 64x64 latent; docs/evaluation.md has the arithmetic); not practical on a 2-core
CPU.
What it should reach: results.md with "core" and "ti" rows over 30 subjects, CoRe - TI
differences with intervals. For scale, DreamBooth's paper reports Textual Inversion on SD at
CLIP-T 0.255 / CLIP-I 0.780 / DINO 0.569 on DreamBench (its CLIP backbone not stated, DINO
ViT-S/16); values move with the backbones, so compare methods within one results.md.
"""

import ml_collections

from core_jax.eval.dreambench_run import paper_config


def get_config(protocol: str = "dreambench") -> ml_collections.ConfigDict:
    return paper_config("sd15", "CORE_JAX_SD15_PATH", protocol)

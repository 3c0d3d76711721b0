"""DreamBench on SD 2.1-base: CoRe against Textual Inversion, 30 subjects x 25 prompts x 4 images.

What it runs: `core-jax dreambench` on google/dreambooth's `dataset/` (30 subjects; the 9 cats
and dogs get the 25 live-subject prompts, the others the 25 object prompts). Every (subject,
method) pair trains as one run of a sweep: "ti" is Textual Inversion at CoRe's stage-1 settings
(one vector from the class word, AdamW 5e-3, batch 6, 300 steps, diffusion loss only, no norm
hold, no stage 2); "core" is the paper's CoRe (the same stage 1 plus L_emb 1.5e-4 and L_attn 0.05
every step and the norm hold over steps 120-180, then stage 2: the whole U-Net, AdamW 2e-6, batch
4, 1000 steps). Then 4 images per prompt (50 DDIM steps, guidance 7.5, the same noise for both
methods), CLIP-T / CLIP-I / DINO per image, and a table of means over subjects with 95 %
intervals and CoRe - TI paired by subject (Holm-adjusted p). docs/evaluation.md has the outputs.

Models: paths from the environment, or the --config fields they fill:
CORE_JAX_SD21_PATH (model.path: a diffusers SD 2.1-base folder), CORE_JAX_DREAMBENCH_ROOT
(dreambench.root), CORE_JAX_CLIP_PATH (dreambench.clip: a transformers CLIPModel folder, e.g.
openai/clip-vit-large-patch14), CORE_JAX_DINO_PATH (dreambench.dino: e.g. facebook/dino-vits16,
DreamBooth's DINO). The command checks all of them before any work, one line per problem.

Command:
    core-jax dreambench --config configs/dreambench_sd21.py --workdir runs/dreambench_sd21 \\
        --config.model.path=/models/stable-diffusion-2-1-base \\
        --config.dreambench.root=/data/dreambooth/dataset \\
        --config.dreambench.clip=/models/clip-vit-large-patch14 \\
        --config.dreambench.dino=/models/dino-vits16 --config.model.dtype=bfloat16
    # the CoRe paper's variant of CLIP-I / DINO (its outfit / accessory prompts left out);
    # in the same workdir it reuses the runs, images and scores and writes a new table:
    core-jax dreambench --config configs/dreambench_sd21.py:core --workdir runs/dreambench_sd21
    # on N devices of one host or a pod, one run per device: --config.sweep.pack=N

Time: about 1.5 minutes per subject for both methods on one H100 in bf16 (an estimate, not
measured: 36 PFLOP per subject by XLA's counts at 40 % of the card's peak; A100: about 5 min;
docs/evaluation.md shows the arithmetic), so under an hour of compute for 30 subjects plus
compiles and checkpoint writes. On a 2-core CPU it is not practical
(tests/test_dreambench_run.py runs the same command on micro models in minutes).
What it should reach: results.md with "core" and "ti" rows over 30 subjects and CoRe - TI
differences with intervals. The CoRe paper reports CoRe at CLIP-T 0.2568 / CLIP-I 0.7054 / DINO
0.5842, but on its own protocol (24 concepts, 20 prompts, 32 images each, CLIP-I and DINO on
foreground-masked images, backbones not stated), so expect its direction (CoRe's CLIP-T above
TI's at similar identity), not those values.
"""

import ml_collections

from core_jax.eval.dreambench_run import paper_config


def get_config(protocol: str = "dreambench") -> ml_collections.ConfigDict:
    return paper_config("sd21", "CORE_JAX_SD21_PATH", protocol)

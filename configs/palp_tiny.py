"""PALP: S* and LoRA adapters on the U-Net's attention, with the prompt-aligned score-sampling
term toward one target prompt, on a tiny random-weight model, to show the machinery runs here.

What it runs: the tiny preset (SD 1.x topology, random weights), scikit-image's photo of Chelsea
the cat as the concept "cat", one stage of `("textual_inversion", "palp")`
(`core_jax/methods/palp.py`; no CoRe): S* and LoRA on every attention layer's to_q, to_k, to_v,
to_out.0 train on the diffusion loss with the caption "a photo of a S*" (y_P), and on PALP's
term: the caption pass's x^_0 is noised again with the row's own noise, the frozen U-Net scores
it with the clean target prompt y_c = "a sketch of a cat in Paris" at guidance 15, the run's own
U-Net with y_P at guidance 7.5, and their difference pulls x^_0 (rescaled by sqrt(SNR)). The
paper's numbers (arXiv 2401.06105, appendix C: rank 32, lr 5e-5, 500 steps, batch 32) are
`palp`'s defaults; here rank 4, 40 steps at batch 2 and a higher learning rate so random
weights visibly move in a short run. Nothing is downloaded. The sample prompts include the
target prompt with S* ("a sketch of a S* in Paris"), the one PALP personalizes for.

Command:
    core-jax train --config configs/palp_tiny.py --workdir runs/palp_tiny

Time here (2-core CPU): measured 15:41 wall (5:37 CPU: the process got 35 % of a core) once,
under load (a full test suite and other helpers on the same 2 cores); almost all of it
compiling the step (the caption pass with its backward, plus the teacher's and the student's
forward passes) and the grid sampler: the 40 steps themselves took seconds.
What it should reach: `diffusion` and `palp` logged and finite at every step (`palp` is
0.5 mean((teacher - student)^2), nonzero from the first step: the teacher reads y_c, the
student y_P; measured 1.22, 0.95, 0.93, 1.39 at steps 10-40, diffusion 1.19-1.35);
pytorch_lora_weights.safetensors (diffusers' `unet.` names) and a1111/lora/chelsea.safetensors
(kohya names), learned_embeds.safetensors, sample grids with the adapters merged. With random
weights the pictures are noise: this run proves the machinery, not the method.
"""

from core_jax.config import base_config, stage_config


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
        ("textual_inversion", "palp"), steps=40, batch_size=2, learning_rate=1e-3,
        weight_decay=1e-2, lora_rank=4, lora_alpha=4.0, lambda_palp=1.0,
        palp_prompt="a sketch of a {cls} in Paris", palp_teacher_guidance=15.0,
        palp_student_guidance=7.5, palp_rescale=True,
    )
    c.stage2.steps = 0
    c.sample.steps = 20
    c.sample.prompts = ("a photo of a {}", "a sketch of a {} in Paris")
    c.checkpoint_every = 20
    return c

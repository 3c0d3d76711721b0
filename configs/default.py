"""The embedded default: CoRe teaches the toy model a concept it never saw, on CPU in minutes.

What it runs: the toy text-to-image model shipped in the package (our CLIP text encoder and a
32-pixel pixel-space U-Net, pretrained on core_jax/toyworld's procedural world; RESULTS.md), the
real CLIP tokenizer, and five rendered photos of a green dotted star on a white background, a
combination the toy model was never shown under one name. CoRe stage 1 (L_emb + L_attn, the
norm hold) learns `S*` from the super-category "star"; stage 2 fine-tunes the U-Net briefly.
The validation grids then place `S*` in contexts the photos never had (grass, snow, night,
sketch and outline styles). Nothing is downloaded.

Command:
    core-jax train --config configs/default.py --workdir runs/default

Time here (2-core CPU): about 4 minutes (3 min 46 s and 4 min 17 s measured, wall clock; 104 s
of it training at ~2.4 steps/s, the rest compiling both stages, sample grids and exports).
What it should reach: every loss term finite and logged; learned_embeds.safetensors, an A1111
embedding, the stage-2 U-Net folder, sample grids, loss curves and checkpoints in the workdir; in
samples/, green dotted stars on grass, in the snow, at night, sketched and outlined.
configs/tiny_cat.py runs the same machinery on a real photo with random-weight SD-topology models.
"""

from core_jax.config import base_config
from core_jax.toyworld import MODEL_DIR, TEMPLATES


def get_config():
    c = base_config()
    c.model.path = str(MODEL_DIR)
    c.concept.name = "green_dotted_star"
    c.concept.images = "toyworld:green dotted star"
    c.concept.super_category = "star"
    c.concept.templates = str(TEMPLATES)
    c.concept.caption = "a {}"  # the toy world's captions never say "photo"
    c.data.resolution = 32
    c.data.num_views = 10
    # No rotation (a square turned 45 degrees is this world's diamond) and no flip (mirrored
    # stripes run the other diagonal, which the world never draws).
    c.data.rotate_p = 0.0
    c.data.flip_p = 0.0
    c.stage1.steps = 200
    c.stage1.batch_size = 4
    c.stage1.rescale_start = 80
    c.stage1.rescale_end = 120
    c.stage2.steps = 50
    c.stage2.batch_size = 4
    c.stage2.learning_rate = 1e-4
    c.sample.steps = 20
    c.sample.guidance_scale = 3.0
    c.sample.every = 100
    c.sample.prompts = (
        "a {}",
        "a {} on grass",
        "a {} in the snow",
        "a {} at night, sketch style",
        "a {} on the beach, outline style",
    )
    c.sample.images_per_prompt = 4
    c.checkpoint_every = 50
    return c

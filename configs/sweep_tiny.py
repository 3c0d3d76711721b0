"""A tiny sweep: 4 concepts x 2 attention weights x 2 attention-loss variants = 16 runs.

What it runs: CoRe stage 1 then 3 steps of stage 2 on scikit-image's photos (a cat, a cup, a
person, the cat again as an "animal"), micro models (random weights), every (concept, setting)
pair as its own run with its own U-Net copy in stage 2. The two
lambda_attn values ride along as per-concept numbers, so each loss variant is one group: one
compiled program per group and stage, 16 runs in 4 packs of 4 concepts.

Command:
    core-jax sweep --config configs/sweep_tiny.py --workdir runs/sweep_tiny
    # on 8 virtual CPU devices (the sweep splits concepts 4 ways and rows 2 ways by itself):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 core-jax sweep \\
        --config configs/sweep_tiny.py --workdir runs/sweep_tiny

Time here: 3-5 minutes on a 2-core CPU, mostly compiling (2 stage-1 programs, 1 stage-2).
What it should reach: sweep_summary.json with 16 runs, 2 groups, "compilations": 4; each
runs/<name>/ holds learned_embeds.safetensors and unet/ equal to that run trained alone with
`core-jax train` (its runs/<name>/config.json).
"""

import ml_collections

from core_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "micro"
    c.data.resolution = 16
    c.data.num_views = 4
    c.stage1.steps = 6
    c.stage1.batch_size = 2
    c.stage1.rescale_start = 2
    c.stage1.rescale_end = 4
    c.stage2.steps = 3  # each run's own U-Net copy, on the devices of its concept shard
    c.stage2.batch_size = 2
    c.stage2.learning_rate = 1e-4
    c.sample.at_end = False  # no grids per run
    c.log_every = 1
    c.checkpoint_every = 2
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (
        dict(name="chelsea", images="builtin:chelsea", super_category="cat", templates="animate"),
        dict(name="coffee", images="builtin:coffee", super_category="cup",
             templates="inanimate"),
        dict(name="astronaut", images="builtin:astronaut", super_category="person",
             templates="animate"),
        dict(name="chelsea-animal", images="builtin:chelsea", super_category="animal",
             templates="animate"),
    )
    c.sweep.grid = (
        ("stage1.lambda_attn", (0.05, 0.5)),
        ("stage1.attn_variant", ("paper", "code")),
    )
    c.sweep.pack = 4  # runs per step (the concept axis)
    c.sweep.concept_shards = 0  # devices the concept axis splits over (0: fitted to the machine)
    return c

"""The CoRe-vs-TI method table in the toy world (issue 8): 8 methods x 10 held-out concepts.

What it runs: every (concept, method) pair as one stage-1 run of a sweep on the pretrained toy
model (32-pixel, pixel space), then samples each learned word in 8 prompts and scores the images
with the toy world's attribute classifiers: identity (shape, colour, pattern as the concept has
them, minus what a prompt changes) and text alignment (the background, style or colour the prompt
asks for). Means over concepts with 95 % Student's t intervals over the per-concept means, and
differences to TI paired by concept.

Concepts: the 9 held-out identities the toy model never saw under one name (each word it knows)
and a pink striped moon, a shape it never saw at all. The super-category word is the shape word;
the moon's is "circle", the known shape it is cut from (a disc with a bite out of it), as a new
kind of dog would start from "dog".

Methods (sweep.settings): TI (diffusion loss only, no norm hold); CoRe (L_emb + L_attn + the
norm hold, stage 1 only); CoRe without L_emb, without L_attn, without the norm hold; CoRe plus
the thesis' pairwise or hinge term; CoRe plus stage 2 (U-Net fine-tuning; "stage 2 off" is the
CoRe row).

Command:
    core-jax benchmark --config configs/toy_benchmark.py --workdir runs/toy_benchmark
    # another toy model or classifier than the shipped ones:
    #   --config.model.path=FOLDER --config.benchmark.classifier=FILE

Time here (2-core CPU shared with other jobs, load average 4-6, run under nice 19): 34 min, of it
29 min training (8 packs of 10 runs, about 3 min each, the stage-2 pack 6 min; 3 stage-1
compilations) and 5 min sampling and scoring (about 4 s per run). Rerunning skips trained and
scored runs. The workdir takes about 600 MB, most of it the packs' checkpoints.

What it should reach with the shipped 6000-step toy model (chance identity is about 0.16; the
model draws colours and patterns far better than shapes, so identity is mostly those): TI
identity 0.39 [0.24, 0.55], text alignment 0.73 [0.66, 0.79]. Against TI, paired by concept:
CoRe text -0.02 [-0.09, +0.05], identity -0.01 [-0.17, +0.14] (no difference resolved); CoRe
without L_emb text -0.07 [-0.11, -0.03]; CoRe + pairwise text +0.14 [+0.08, +0.21] at identity
-0.10 [-0.28, +0.08] (its grid shows colours lost); CoRe + hinge text +0.07 [-0.02, +0.16].
Every method mostly fails "outline style", and all but pairwise "on the beach" (the learned word
keeps its white background).

Known flaws (issue 16), kept so the numbers above reproduce: seven of the eight prompts are
regularization templates verbatim (`benchmark.prompts_may_repeat_templates`; results.md warns),
one seed, and the lambdas were chosen on the outcome. configs/toy_benchmark_v2.py is the redone
benchmark; one seed here means the seed-spread column reads "-".
"""

import ml_collections

from core_jax.config import base_config
from core_jax.toyworld import CLASSIFIER_PATH, MODEL_DIR, TEMPLATES
from core_jax.toyworld.world import HELD_OUT_IDENTITIES, HELD_OUT_SHAPE, Identity

# The moon's super-category word: the known shape it is cut from.
MOON_SUPER_CATEGORY = "circle"


def _concept(identity: Identity, super_category: str) -> dict:
    return dict(
        name=identity.words.replace(" ", "_"), images=f"toyworld:{identity.words}",
        super_category=super_category, templates=str(TEMPLATES),
    )


def get_config():
    c = base_config()
    c.model.path = str(MODEL_DIR)
    c.concept.caption = "a {}"  # the toy model never saw "photo"; the shortest caption it knows
    c.data.resolution = 32
    c.data.num_views = 10  # two of each of the 5 photos: without rotation or flip, views repeat
    # No rotation: a square turned 45 degrees is this world's diamond. No flip: a mirrored moon
    # and mirrored (anti-diagonal) stripes are shapes and patterns the world never draws.
    c.data.rotate_p = 0.0
    c.data.flip_p = 0.0
    c.stage1.steps = 200
    c.stage1.batch_size = 4
    c.stage1.learning_rate = 5e-3
    # 100x the paper's weights (1.5e-4, 0.05, tuned on SD): with those, CoRe scored as TI to the
    # third decimal on 3 concepts with an earlier toy model (L_emb ~0.1 and L_attn ~2e-4 against
    # a diffusion loss of ~0.1); 30x still changed nothing, 100x raised text alignment by 0.13.
    c.stage1.lambda_emb = 1.5e-2
    c.stage1.lambda_attn = 5.0
    c.stage1.rescale_start = 80
    c.stage1.rescale_end = 120
    c.stage2.steps = 0
    c.stage2.batch_size = 4
    c.stage2.learning_rate = 1e-4
    c.sample.at_end = False  # the benchmark draws its own images
    c.log_every = 20
    c.checkpoint_every = 100

    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = tuple(
        _concept(i, i.shape) for i in HELD_OUT_IDENTITIES
    ) + (_concept(Identity(HELD_OUT_SHAPE, "pink", "striped"), MOON_SUPER_CATEGORY),)
    no_regularizers = {"stage1.lambda_emb": 0.0, "stage1.lambda_attn": 0.0}
    c.sweep.settings = (
        # TI lists only its own method: its program has no regularizer pass at all.
        dict(name="ti", overrides={**no_regularizers, "stage1.methods": ("textual_inversion",)}),
        dict(name="core", overrides={}),
        dict(name="core_no_emb", overrides={"stage1.lambda_emb": 0.0}),
        dict(name="core_no_attn", overrides={"stage1.lambda_attn": 0.0}),
        dict(name="core_no_rescale", overrides={"stage1.rescale_end": 0}),
        dict(name="core_pairwise", overrides={"stage1.lambda_pairwise": 0.1}),
        dict(name="core_hinge", overrides={"stage1.lambda_hinge": 0.1}),
        dict(name="core_stage2", overrides={"stage2.steps": 100}),
    )
    c.sweep.grid = ()
    c.sweep.pack = 10
    c.sweep.concept_shards = 0  # fitted to the machine

    c.benchmark = ml_collections.ConfigDict()
    c.benchmark.classifier = str(CLASSIFIER_PATH)
    # "{}" is the learned word; "{recolour}" the concept's contrast colour (red <-> teal, ...).
    # Each prompt's checked attributes are the words it names: backgrounds (recontextualisation),
    # styles, both, and a colour change (which identity then leaves out).
    c.benchmark.prompts = (
        "a {} on grass",
        "a {} in the snow",
        "a {} at night",
        "a {} on the beach",
        "a {}, sketch style",
        "a {}, outline style",
        "a {} in the sky, framed style",
        "a {recolour} {}",
    )
    # Seven of these eight prompts are regularization templates verbatim (issue 16): kept so
    # this config reproduces the issue-8 table above, with the flaw named in its results.md.
    # configs/toy_benchmark_v2.py holds prompts the templates never contain.
    c.benchmark.prompts_may_repeat_templates = True
    c.benchmark.images_per_prompt = 4
    c.benchmark.sampler = "ddim"
    c.benchmark.steps = 20  # 32 images of a run in about 3 s here
    c.benchmark.guidance_scale = 3.0
    c.benchmark.seed = 0
    c.benchmark.reference = "ti"  # differences are reported against this method
    return c

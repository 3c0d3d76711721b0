"""The config every `configs/*.py` starts from: CoRe's hyper-parameters as the paper states them.

Configs import `base_config()` and change what differs.
DESIGN.md ("CoRe, exactly") is the source of every number here.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Where the models come from: a local diffusers folder, or random weights of a named shape.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)
    c.model.preset = "sd15"  # used when path is empty: random weights (tiny, bench_small, ...)
    c.model.allow_pickle = False  # refuse .bin weights unless the user trusts them
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay fp32)

    # The concept: photos and what it is.
    c.concept = ml_collections.ConfigDict()
    c.concept.name = "concept"  # names the exported files (e.g. <name>.a1111.safetensors)
    c.concept.images = ""  # a folder of photos, or "builtin:chelsea" / "builtin:coffee"
    c.concept.super_category = ""  # "dog", "teapot", ... (several tokens are fine)
    c.concept.placeholder = "<s*>"
    c.concept.num_vectors = 1
    c.concept.templates = "animate"  # "animate", "inanimate", or a file with one "{}" per line
    c.concept.caption = "a photo of a {}"

    # Views: CoRe's augmentation, encoded once by the VAE into a pool the steps sample from.
    c.data = ml_collections.ConfigDict()
    c.data.resolution = 512
    c.data.num_views = 64
    c.data.rotate_p = 0.75
    c.data.max_angle = 45.0
    c.data.flip_p = 0.25

    # Stage 1: the embedding, with the context regularizers.
    c.stage1 = ml_collections.ConfigDict()
    c.stage1.steps = 300
    c.stage1.batch_size = 6
    c.stage1.learning_rate = 5e-3
    c.stage1.b1 = 0.9
    c.stage1.b2 = 0.999
    c.stage1.weight_decay = 1e-2
    c.stage1.clip_norm = 0.0  # 0 = no clipping (the paper's setting)
    # lambda_emb / lambda_attn were tuned by the authors with the official code's variants
    # ("code"). With the paper's attention variant (batch mean), the same lambda_attn is
    # batch_size times weaker than the code's batch sum.
    c.stage1.lambda_emb = 1.5e-4
    c.stage1.lambda_attn = 0.05
    c.stage1.emb_variant = "paper"  # "paper": cosine over features; "code": over tokens
    c.stage1.attn_variant = "paper"  # "paper": layer-mean then MSE; "code": per layer, batch sum
    c.stage1.lambda_pairwise = 0.0  # thesis: pairwise token-cosine matrices, L1
    c.stage1.lambda_hinge = 0.0  # thesis: max(0, margin - cos(v*, v_cat))
    c.stage1.hinge_margin = 0.5
    c.stage1.rescale_start = 120  # hold the embedding norm from this step...
    c.stage1.rescale_end = 180  # ...through this one; 0 disables
    c.stage1.min_snr_gamma = 0.0  # 0 = uniform loss weighting (the paper)

    # Stage 2: the U-Net, embedding frozen, no regularizers. steps = 0 skips it.
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.steps = 1000
    c.stage2.batch_size = 4
    c.stage2.learning_rate = 2e-6
    c.stage2.weight_decay = 1e-2
    c.stage2.clip_norm = 0.0

    # Sampling for validation grids during training and for `core-jax sample`.
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"  # or "dpmpp_2m"
    c.sample.steps = 50
    c.sample.guidance_scale = 7.5
    c.sample.every = 0  # validation grid every N steps of each stage; 0 = only at the ends
    c.sample.prompts = (
        "a photo of a {}",
        "a {} in the jungle",
        "a {} in the snow, watercolor",
        "a {} on the beach, oil painting",
    )
    c.sample.images_per_prompt = 2

    c.max_nonfinite = 10  # stop after this many steps in a row skipped for NaN/inf
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    return c

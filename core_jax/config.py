"""The config every `configs/*.py` starts from: CoRe's hyper-parameters as the paper states them.

Configs import `base_config()` and change what differs. A stage lists its methods
(`core_jax.methods`, `core-jax methods`) and holds the keys they read; `stage_config` builds one
from the methods' defaults. DESIGN.md ("CoRe, exactly") is the source of every number here.

`CONFIG_VERSION` is written into every saved config.json; `migrate` brings a config saved by an
earlier version to today's keys with the same meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from core_jax.errors import InputError
from core_jax.methods import get_method

CONFIG_VERSION = 2

# Keys every stage has, whatever its methods.
STAGE_KEYS = {
    "methods": (), "steps": 0, "batch_size": 1, "learning_rate": 1e-3, "b1": 0.9, "b2": 0.999,
    "weight_decay": 1e-2, "clip_norm": 0.0,  # clip_norm 0 = no clipping
    # "auto": a trained whole-U-Net copy (stage 2, DreamBooth) keeps its parameters and AdamW
    # state split over the devices of its run's data axis when there are several (FSDP-style:
    # 1/n of the bytes per device); "off": every device holds it whole.
    "shard_state": "auto",
    # How each row's timestep is drawn: "uniform" over [0, T), or "snr_weighted" (TextBoost's
    # p_t proportional to max_s log SNR(s) - log SNR(t); `core_jax.diffusion`).
    "timestep_sampling": "uniform",
}
# What base_config's stage 1 lists: the weights decide which terms are present (a zero weight
# drops a term from the program), so TI is this with both CoRe weights and the norm hold off.
STAGE1_METHODS = ("textual_inversion", "core", "pairwise", "hinge")


def stage_config(methods: Sequence[str], **values: Any) -> ml_collections.ConfigDict:
    """A stage's config: its optimizer keys and every key its methods read, at their defaults,
    then `values`."""
    config = dict(STAGE_KEYS, methods=tuple(methods))
    for name in methods:
        config.update(get_method(name).defaults)
    unknown = set(values) - set(config)
    if unknown:
        raise KeyError(f"stage keys {sorted(unknown)} belong to none of {list(methods)}")
    config.update(values)
    return ml_collections.ConfigDict(config)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.version = CONFIG_VERSION
    c.seed = 0

    # Where the models come from: a local diffusers folder, or random weights of a named shape.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/)
    c.model.preset = "sd15"  # used when path is empty: random weights (tiny, bench_small, ...)
    c.model.allow_pickle = False  # refuse .bin weights unless the user trusts them
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay fp32)
    # How attention is computed (auto, explicit, chunked, xla, cudnn; "auto" picks by backend)
    # and what the U-Net's backward pass recomputes instead of storing (none, transformer_block,
    # unet_block, dots_saveable). Neither changes the numbers, only time and memory.
    c.model.attention = "auto"
    c.model.remat = "none"
    # Where the text encoders' pooled output (SDXL's added text embedding) is read: at the
    # end-of-text token ("end_of_text", as A1111 and ComfyUI do), or as transformers reads the
    # folder's config ("as_config": SDXL base's legacy eos_token_id 2 pools at argmax of the ids,
    # i.e. at the learned token, which is what diffusers' pipeline computes).
    c.model.pooling = "end_of_text"

    # The concept: photos and what it is.
    c.concept = ml_collections.ConfigDict()
    c.concept.name = "concept"  # names the exported files (e.g. <name>.a1111.safetensors)
    c.concept.images = ""  # a folder of photos, or "builtin:chelsea" / "builtin:coffee"
    c.concept.super_category = ""  # "dog", "teapot", ... (several tokens are fine)
    c.concept.placeholder = "<s*>"
    # The word whose input embedding S* starts at; "" = the super-category. DreamBooth's rare
    # identifier: "sks" (with S* frozen, "a photo of a S* dog" is then "a photo of a sks dog").
    c.concept.init_word = ""
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
    # "core": the augmentation above; "custom_diffusion": Custom Diffusion's zoom in / out with
    # object masks (core_jax.data.zoom_views; flip_p applies, the rotation keys do not).
    # Configs saved before this key existed read as "core".
    c.data.augmentation = "core"

    # Stage 1: the embedding, with the context regularizers (the methods' defaults are the
    # paper's: lambda_emb 1.5e-4, lambda_attn 0.05, the norm hold over steps 120-180; pairwise
    # and hinge off). lambda_emb / lambda_attn were tuned by the authors with the official
    # code's variants; with the paper's attention variant (batch mean) the same lambda_attn is
    # batch_size times weaker than the code's batch sum. emb_encoders ("joined") and attn_layers
    # ("all") choose which encoders' states L_emb compares (SDXL has two) and which
    # cross-attention layers L_attn averages (core_jax/methods/core.py); configs saved before
    # them read as those defaults.
    c.stage1 = stage_config(
        STAGE1_METHODS, steps=300, batch_size=6, learning_rate=5e-3, weight_decay=1e-2,
    )
    # Stage 2: the U-Net, embedding frozen, no regularizers. steps = 0 skips it.
    c.stage2 = stage_config(
        ("unet_finetune",), steps=1000, batch_size=4, learning_rate=2e-6, weight_decay=1e-2,
    )

    # Sampling for validation grids during training and for `core-jax sample`.
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"  # or "dpmpp_2m"
    c.sample.steps = 50
    c.sample.guidance_scale = 7.5
    c.sample.every = 0  # validation grid every N steps of each stage; 0 = only at the ends
    c.sample.at_end = True  # a grid when each stage ends (sweeps usually turn this off)
    c.sample.prompts = (
        "a photo of a {}",
        "a {} in the jungle",
        "a {} in the snow, watercolor",
        "a {} on the beach, oil painting",
    )
    c.sample.images_per_prompt = 2

    c.max_nonfinite = 10  # stop a run after this many steps in a row skipped for NaN/inf
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    return c


def migrate(saved: dict[str, Any]) -> dict[str, Any]:
    """A config.json of an earlier version, as today's keys with the same meaning.

    Version 1 (no `version` key): stage 1 was every text-side term switched by its weight, stage
    2 fine-tuned the U-Net with stage 1's min_snr_gamma, and both stages drew grids at their
    ends. Raises ValueError for a version newer than this one."""
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    version = saved.get("version", 1)
    if version > CONFIG_VERSION:
        raise ValueError(f"it was written by a newer core-jax (config version {version}; this "
                         f"one reads up to {CONFIG_VERSION})")
    if version == 1:
        stage1, stage2 = saved.get("stage1", {}), saved.get("stage2", {})
        stage1.setdefault("methods", list(STAGE1_METHODS))
        stage2.setdefault("methods", ["unet_finetune"])
        stage2.setdefault("b1", 0.9)
        stage2.setdefault("b2", 0.999)
        stage2.setdefault("min_snr_gamma", stage1.get("min_snr_gamma", 0.0))
        saved.setdefault("sample", {}).setdefault("at_end", True)
        saved["version"] = CONFIG_VERSION
    # A key a method gained after the run was saved takes its default: the behaviour the run
    # had before the key existed.
    for name, stage in saved.items():
        if name.startswith("stage") and isinstance(stage, dict):
            stage.setdefault("shard_state", STAGE_KEYS["shard_state"])
            stage.setdefault("timestep_sampling", STAGE_KEYS["timestep_sampling"])
            for method in stage.get("methods", ()):
                try:
                    defaults = get_method(method).defaults
                except InputError:
                    continue  # check_stage names it in one line
                for key, value in defaults.items():
                    stage.setdefault(key, value)
    # Keys added within version 2, at the value that behaves as before them.
    saved.setdefault("concept", {}).setdefault("init_word", "")
    saved.setdefault("data", {}).setdefault("augmentation", "core")
    saved.setdefault("model", {}).setdefault("attention", "auto")
    saved["model"].setdefault("remat", "none")
    saved["model"].setdefault("pooling", "end_of_text")
    return saved

"""Building a run's pieces from its config: models, tokenizer, concept photos, the latent pool."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError
from transformers import CLIPTokenizer

from core_jax import data as image_data
from core_jax import weights
from core_jax.diffusion import NoiseSchedule, load_schedule, make_schedule
from core_jax.diffusion.samplers import SAMPLERS
from core_jax.errors import InputError
from core_jax.methods.diffusion_term import MASKED_LOSS
from core_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from core_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from core_jax.models.pixel import PixelSpace, is_pixel_space_unet
from core_jax.models.presets import PRESETS, random_models
from core_jax.models.unet import REMAT_POLICIES, UNet2DConditionModel
from core_jax.models.vae import AutoencoderKL
from core_jax.sample import Pipeline
from core_jax.text import (
    add_placeholder_tokens,
    caption_ids,
    check_prompt,
    clip_tokenizer_dir,
    fill_prompt,
    load_templates,
    load_tokenizer,
    placeholder_string,
    regularization_prompts,
    super_category_ids,
    tokenize,
)
from core_jax.train.concepts import ConceptSpec, LatentPool, build_concept_data
from core_jax.train.passes import StepModels
from core_jax.train.stages import build_program, check_stage, stage_names
from core_jax.train.state import ConceptData

DTYPES = ("float32", "bfloat16", "float16")
AUGMENTATIONS = ("core", "custom_diffusion")  # data.augmentation: the view pool's making
# Integer settings and their smallest sensible value; below it a run divides by zero, draws
# from an empty pool or never samples.
MINIMUMS = {
    "concept.num_vectors": 1, "data.resolution": 1, "data.num_views": 1, "stage1.steps": 1,
    "stage1.batch_size": 1, "stage2.steps": 0, "stage2.batch_size": 1, "sample.steps": 1,
    "sample.images_per_prompt": 1, "sample.every": 0, "log_every": 1, "checkpoint_every": 1,
    "keep_checkpoints": 1, "max_nonfinite": 1,
}


@dataclasses.dataclass
class Models:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL | PixelSpace
    params: dict[str, Any]  # {"text": ..., "unet": ..., "vae": ...}, SDXL also "text_2"
    schedule: NoiseSchedule
    # SDXL's second text encoder and tokenizer (which pads with "!"); None for SD 1.x/2.x.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    identity: str = ""  # which weights these are (`model_identity`): caches are keyed by it

    @property
    def frozen_text(self) -> dict[str, Any]:
        """The text encoders' weights a step reads: {"text"}, SDXL also {"text_2"}."""
        return {k: v for k, v in self.params.items() if k in ("text", "text_2")}


def run_tokenizer(config: ml_collections.ConfigDict) -> CLIPTokenizer:
    """The tokenizer of `model.path`, or SD 1.x's (shipped) for random weights. Cheap next to
    the weights, so a run checks its text with it before loading them."""
    if not config.model.path:
        return load_tokenizer()
    path = Path(config.model.path)
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist")
    try:
        return load_tokenizer(path)
    except FileNotFoundError as err:  # its message names the files looked for
        raise InputError(str(err)) from err
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the tokenizer of {path}: {err}") from err


def load_models(
    config: ml_collections.ConfigDict, tokenizer: CLIPTokenizer | None = None
) -> Models:
    """From `model.path` (a diffusers folder) or, without one, random weights of `model.preset`
    seeded by `seed` (the embedded default: nothing to download). `tokenizer`: the run's, when
    loaded already (`run_tokenizer`, perhaps with placeholder tokens added)."""
    dtype = jnp.dtype(config.model.dtype)
    if tokenizer is None:
        tokenizer = run_tokenizer(config)
    text_encoder_2 = tokenizer_2 = None
    if config.model.path:
        path, allow = Path(config.model.path), config.model.allow_pickle
        try:
            if (path / "text_encoder_2").is_dir():
                sdxl = weights.load_sdxl(path, dtype, allow, config.model.pooling)
                text_encoder, unet, vae = sdxl.text_encoder, sdxl.unet, sdxl.vae
                text_encoder_2, params = sdxl.text_encoder_2, sdxl.params
                tokenizer_2 = load_tokenizer(path, "tokenizer_2")
            else:
                text_encoder, text_params = weights.load_text_encoder(
                    path, dtype, allow, config.model.pooling)
                unet, unet_params = weights.load_unet(path, dtype, allow)
                vae, vae_params = load_vae_or_pixel_space(path, unet, dtype, allow)
                params = {"text": text_params, "unet": unet_params, "vae": vae_params}
        except InputError:
            raise
        # Truncated or garbled files (a bad header or JSON), a shard its index names missing.
        except (OSError, ValueError, SafetensorError) as err:
            raise InputError(f"cannot read the model folder {path}: {err}") from err
        schedule = _schedule(path)
    else:
        random = random_models(config.model.preset, config.seed, dtype)
        text_encoder, unet, vae = random.text_encoder, random.unet, random.vae
        text_encoder_2, params = random.text_encoder_2, dict(random.params)
        if text_encoder_2 is not None:  # SDXL's second tokenizer: the same BPE, "!" padding
            tokenizer_2 = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), pad_token="!")
        schedule = make_schedule()
    # How the U-Net and the VAE compute (older saved configs lack the keys: the defaults).
    attention = config.model.get("attention", "auto")
    unet = unet.clone(attention=attention, remat=config.model.get("remat", "none"))
    if isinstance(vae, AutoencoderKL):
        vae = vae.clone(attention=attention)
    return Models(tokenizer, text_encoder, unet, vae, params, schedule, tokenizer_2,
                  text_encoder_2, model_identity(config))


def model_identity(config: ml_collections.ConfigDict) -> str:
    """What `load_models(config)` loads, as a string that changes when the weights do: a
    folder by its path and its files' sizes and modification times, random weights by preset
    and seed; and the compute dtype."""
    dtype = config.model.dtype
    if not config.model.path:
        return f"preset={config.model.preset},seed={config.seed},dtype={dtype}"
    path = Path(config.model.path).resolve()
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    stamps = "\n".join(f"{f.relative_to(path)} {f.stat().st_size} {f.stat().st_mtime_ns}"
                       for f in files)
    digest = hashlib.sha256(stamps.encode()).hexdigest()[:16]
    return f"folder={path},files={digest},dtype={dtype}"


def _schedule(path: Path) -> NoiseSchedule:
    if (path / "scheduler" / "scheduler_config.json").is_file():
        return load_schedule(path)
    # A v-prediction model (SD 2.x 768) trained with SD's default epsilon schedule learns
    # nonsense without an error: say which schedule is used.
    warnings.warn(
        f"{path} has no scheduler/scheduler_config.json; using Stable Diffusion's default "
        "schedule (scaled_linear betas, epsilon prediction)",
        stacklevel=3,
    )
    return make_schedule()


def load_vae_or_pixel_space(
    path: Path, unet: UNet2DConditionModel, dtype: jnp.dtype, allow_pickle: bool
) -> tuple[AutoencoderKL | PixelSpace, Any]:
    """The folder's VAE, or pixel space for a folder without `vae/` whose U-Net denoises RGB
    images (3 channels out; 3 in, or 5 with coordinate channels): then the latent pool is the
    images themselves."""
    if not (path / "vae").is_dir() and is_pixel_space_unet(unet.config.in_channels,
                                                          unet.config.out_channels):
        return PixelSpace(dtype=dtype), {}
    return weights.load_vae(path, dtype, allow_pickle)


def vae_factor(vae: AutoencoderKL | PixelSpace) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def augmentation_of(config: ml_collections.ConfigDict) -> str:
    """`data.augmentation`; "core" for configs saved before the key existed."""
    return config.data.get("augmentation", "core")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse values that would otherwise fail deep inside setup, a compiled step, or the sampler
    at the end of a stage (after the training time is spent): one line naming the key."""
    for key, minimum in MINIMUMS.items():
        if _value(config, key) < minimum:
            raise InputError(f"{key} is {_value(config, key)}; it must be at least {minimum}")
    stages = stage_names(config)
    for stage in stages:
        check_stage(stage, config[stage])
        for key in ("num_class_images", "class_steps"):  # prior preservation's pool
            if key in config[stage] and config[stage][key] < 1:
                raise InputError(f"{stage}.{key} is {config[stage][key]}; it must be at least 1")
        value = config[stage].learning_rate
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{stage}.learning_rate is {value}; it must be a positive number")
    for key in ("data.rotate_p", "data.flip_p"):
        if not 0 <= _value(config, key) <= 1:
            raise InputError(f"{key} is {_value(config, key)}; a probability is between 0 and 1")
    choices = {"sample.sampler": SAMPLERS, "model.dtype": DTYPES,
               "model.attention": ATTENTION_IMPLEMENTATIONS, "model.remat": REMAT_POLICIES,
               "model.pooling": ("end_of_text", "as_config")}
    if not config.model.path:
        choices["model.preset"] = tuple(PRESETS)
    for key, allowed in choices.items():
        if _value(config, key) not in allowed:
            raise InputError(
                f"{key} is {_value(config, key)!r}; choose one of {', '.join(allowed)}"
            )
    augmentation = augmentation_of(config)
    if augmentation not in AUGMENTATIONS:
        raise InputError(f"data.augmentation is {augmentation!r}; choose one of "
                         f"{', '.join(AUGMENTATIONS)}")
    for stage in stages:
        if config[stage].get(MASKED_LOSS) and augmentation != "custom_diffusion":
            raise InputError(f"{stage}.masked_loss needs views with object masks: set "
                             "data.augmentation = 'custom_diffusion' (or masked_loss = False)")
    if not config.concept.super_category.strip():
        raise InputError(
            "concept.super_category is empty: set it to the word for what the concept is, "
            "e.g. --config.concept.super_category=dog"
        )
    if not config.sample.prompts:
        raise InputError("sample.prompts is empty; give at least one prompt with a '{}'")
    for prompt in (config.concept.caption, *config.sample.prompts):
        check_prompt(prompt)


def check_resolution(config: ml_collections.ConfigDict, models: Models) -> None:
    factor = vae_factor(models.vae)
    if config.data.resolution % factor:
        expected = models.unet.config.sample_size * factor
        raise InputError(
            f"data.resolution {config.data.resolution} is not a multiple of the VAE's factor "
            f"{factor} (the model was trained at {expected})"
        )


def check_stages_on_model(config: ml_collections.ConfigDict, models: Models) -> None:
    """Each stage's methods built against the model (its text encoders, its cross-attention
    layers), so a choice the model cannot meet (`stage1.emb_encoders="clip_g"` with one text
    encoder, `stage1.attn_layers` naming no layer) fails in one line before anything is
    written."""
    step = StepModels(models.text_encoder, models.unet, (), (), models.text_encoder_2)
    for name in stage_names(config):
        build_program([config[name]], step, models.schedule.prediction_type)


def concept_images(config: ml_collections.ConfigDict) -> list[np.ndarray]:
    return image_data.concept_images(config.concept.images, config.data.resolution, config.seed)


def concept_templates(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    try:
        return tuple(load_templates(config.concept.templates))
    except FileNotFoundError as err:
        raise InputError(f"concept.templates: {err}") from err


@dataclasses.dataclass(frozen=True)
class ConceptText:
    """The run's text, checked: placeholder ids (added to the tokenizer), the text that stands
    for the concept ("<s*> <s*>_1"), the caption's ids and the regularization templates."""

    placeholder_ids: list[int]
    text: str
    caption: np.ndarray
    templates: tuple[str, ...]


def concept_text(config: ml_collections.ConfigDict, tokenizer: CLIPTokenizer) -> ConceptText:
    """Add the placeholder tokens to `tokenizer` and tokenize every prompt of the run now, so
    that a bad placeholder, super-category, template or prompt fails (or warns) before anything
    is written or compiled."""
    c = config.concept
    placeholder_ids = add_placeholder_tokens(tokenizer, c.placeholder, c.num_vectors)
    text = placeholder_string(c.placeholder, c.num_vectors)
    word_ids = super_category_ids(tokenizer, c.super_category)
    if len(word_ids) > 1:
        pieces = ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(word_ids))
        warnings.warn(
            f"super-category {c.super_category!r} is not one token of the vocabulary but "
            f"{len(word_ids)} ({pieces}); the vector starts from their mean and the "
            "regularizers compare against all of them (check the spelling if that is a surprise)",
            stacklevel=2,
        )
    if c.init_word and not tokenizer.encode(c.init_word, add_special_tokens=False):
        raise InputError(f"concept.init_word {c.init_word!r} gives no tokens; give a word such "
                         "as 'sks', or '' to start S* at the super-category")
    templates = concept_templates(config)
    # Built again with the encoder later; here for its errors (a template holding the
    # placeholder) and truncation warnings while nothing is written yet.
    regularization_prompts(tokenizer, templates, text, c.super_category)
    tokenize(tokenizer, [fill_prompt(p, text, c.super_category) for p in config.sample.prompts])
    return ConceptText(placeholder_ids, text,
                       caption_ids(tokenizer, text, c.caption, super_category=c.super_category),
                       templates)


def step_models(
    models: Models, tokenizer: CLIPTokenizer, placeholder_ids: Sequence[int],
    caption: Sequence[int],
) -> StepModels:
    """What a step program is built around. SDXL: the second encoder and the tokenizers' ids it
    needs (each row's add-time ids come with its view, `LatentPool.time_ids`)."""
    sdxl = {}
    if models.text_encoder_2 is not None:
        sdxl = dict(text_encoder_2=models.text_encoder_2, eos_id=tokenizer.eos_token_id,
                    pad_id_2=models.tokenizer_2.pad_token_id)
    return StepModels(models.text_encoder, models.unet, tuple(int(i) for i in caption),
                      tuple(int(i) for i in placeholder_ids), **sdxl)


def sampling_pipeline(
    models: Models, tokenizer: CLIPTokenizer, placeholder_ids: Sequence[int], placeholder: str,
    unet_params: Any = None,
) -> Pipeline:
    """The run's sampler: `tokenizer` knows the placeholder tokens (`placeholder_ids`); SDXL's
    second tokenizer gets the same ones. `unet_params`: a trained U-Net (default: the frozen)."""
    sdxl = {}
    if models.text_encoder_2 is not None:
        tokenizer_2 = copy.deepcopy(models.tokenizer_2)
        if placeholder_ids and add_placeholder_tokens(
                tokenizer_2, placeholder, len(placeholder_ids)) != list(placeholder_ids):
            raise InputError("the two tokenizers give the placeholder tokens different ids")
        sdxl = dict(tokenizer_2=tokenizer_2, text_encoder_2=models.text_encoder_2,
                    text_2_params=models.params["text_2"])
    return Pipeline(
        tokenizer, tuple(placeholder_ids), models.text_encoder, models.params["text"],
        models.unet, models.params["unet"] if unet_params is None else unet_params, models.vae,
        models.params["vae"], models.schedule, placeholder=placeholder, **sdxl,
    )


def concept_data(
    models: Models, tokenizer: CLIPTokenizer, placeholder_text: str,
    specs: Sequence[ConceptSpec], latent_pools: Sequence[LatentPool], **prior: Any,
) -> ConceptData:
    """`build_concept_data` with the run's encoders (both, for SDXL); `prior`: its class
    pools, class prompts and captions, when a stage preserves the prior, and `with_phrases`
    when a stage reads ClassDiffusion's phrases."""
    sdxl = {}
    if models.text_encoder_2 is not None:
        sdxl = dict(text_encoder_2=models.text_encoder_2, text_2_params=models.params["text_2"],
                    pad_id_2=models.tokenizer_2.pad_token_id)
    return build_concept_data(tokenizer, models.text_encoder, models.params["text"],
                              placeholder_text, specs, latent_pools, **sdxl, **prior)


def sdxl_width_1(config: ml_collections.ConfigDict) -> int | None:
    """For an SDXL run, the first encoder's width (how its learned vectors [V, D1 + D2] split
    for the SDXL embedding file); None for SD 1.x/2.x. Read from the config's folder or preset
    without loading weights."""
    if config.model.path:
        path = Path(config.model.path)
        if not (path / "text_encoder_2").is_dir():
            return None
        return int(json.loads((path / "text_encoder" / "config.json").read_text())["hidden_size"])
    preset = PRESETS.get(config.model.preset)
    return preset.text.hidden_size if preset is not None and preset.text_2 is not None else None


def encode_latent_pool(
    vae: AutoencoderKL | PixelSpace, vae_params: Any, views: np.ndarray, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Encode augmented views [N, H, W, 3] once: scaled latent mean and std [N, h, w, 4]."""

    @jax.jit
    def encode(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
        scale = vae.config.scaling_factor
        return mean * scale, jnp.exp(0.5 * logvar) * scale

    means, stds = [], []
    for start in range(0, len(views), batch_size):
        chunk = views[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        mean, std = encode(vae_params, jnp.asarray(padded))  # one shape: one compilation
        means.append(np.asarray(mean)[: len(chunk)])
        stds.append(np.asarray(std)[: len(chunk)])
    return np.concatenate(means), np.concatenate(stds)


def latent_pool(
    config: ml_collections.ConfigDict, models: Models, images: list[np.ndarray]
) -> LatentPool:
    """CoRe's augmentation applied `data.num_views` times, then encoded: mean, std and each
    view's add-time ids."""
    check_resolution(config, models)
    resolution = config.data.resolution
    views, time_ids = image_data.augmented_views_with_time_ids(
        images, config.data.num_views, resolution, config.seed,
        rotate_p=config.data.rotate_p, max_angle=config.data.max_angle,
        flip_p=config.data.flip_p,
    )
    mean, std = encode_latent_pool(models.vae, models.params["vae"], views)
    return LatentPool(mean, std, time_ids=time_ids)


def masked_latent_pool(
    config: ml_collections.ConfigDict, models: Models, images: list[np.ndarray]
) -> LatentPool:
    """Custom Diffusion's zoom augmentation (`core_jax.data.zoom_views`) applied
    `data.num_views` times, then encoded: mean, std, object masks [P, h, w, 1] and each
    view's add-time ids."""
    check_resolution(config, models)
    views, masks, time_ids = image_data.zoom_views_with_time_ids(
        images, config.data.num_views, config.data.resolution, vae_factor(models.vae),
        config.seed, flip_p=config.data.flip_p,
    )
    mean, std = encode_latent_pool(models.vae, models.params["vae"], views)
    return LatentPool(mean, std, masks, time_ids)


def view_pool(
    config: ml_collections.ConfigDict, models: Models, images: list[np.ndarray]
) -> LatentPool:
    """The run's latent pool as `data.augmentation` makes it: CoRe's, or Custom Diffusion's
    with object masks."""
    if augmentation_of(config) == "custom_diffusion":
        return masked_latent_pool(config, models, images)
    return latent_pool(config, models, images)

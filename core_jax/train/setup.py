"""Building a run's pieces from its config: models, tokenizer, concept photos, the latent pool."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from transformers import CLIPTokenizer

from core_jax import data as image_data
from core_jax import weights
from core_jax.diffusion import NoiseSchedule, load_schedule, make_schedule
from core_jax.errors import InputError
from core_jax.models.clip_text import CLIPTextModel
from core_jax.models.presets import random_models
from core_jax.models.unet import UNet2DConditionModel
from core_jax.models.vae import AutoencoderKL
from core_jax.text import load_templates, load_tokenizer


@dataclasses.dataclass
class Models:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    params: dict[str, Any]  # {"text": ..., "unet": ..., "vae": ...}
    schedule: NoiseSchedule


def load_models(config: ml_collections.ConfigDict) -> Models:
    """From `model.path` (a diffusers folder) or, without one, random weights of `model.preset`
    seeded by `seed` (the embedded default: nothing to download)."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.path:
        path, allow = Path(config.model.path), config.model.allow_pickle
        text_encoder, text_params = weights.load_text_encoder(path, dtype, allow)
        unet, unet_params = weights.load_unet(path, dtype, allow)
        vae, vae_params = weights.load_vae(path, dtype, allow)
        tokenizer = load_tokenizer(path)
        scheduler_config = path / "scheduler" / "scheduler_config.json"
        schedule = load_schedule(path) if scheduler_config.is_file() else make_schedule()
    else:
        random = random_models(config.model.preset, config.seed, dtype)
        text_encoder, unet, vae = random.text_encoder, random.unet, random.vae
        text_params, unet_params, vae_params = (random.params[k] for k in ("text", "unet", "vae"))
        tokenizer = load_tokenizer()
        schedule = make_schedule()
    return Models(
        tokenizer, text_encoder, unet, vae,
        {"text": text_params, "unet": unet_params, "vae": vae_params}, schedule,
    )


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def concept_images(config: ml_collections.ConfigDict) -> list[np.ndarray]:
    source = config.concept.images
    if not source:
        raise InputError("no concept images: set --config.concept.images to a folder of photos")
    if source.startswith("builtin:"):
        return image_data.builtin_concept(source.removeprefix("builtin:"))
    return image_data.load_concept_images(source, min_size=config.data.resolution)


def concept_templates(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(load_templates(config.concept.templates))


def encode_latent_pool(
    vae: AutoencoderKL, vae_params: Any, views: np.ndarray, batch_size: int = 8
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
) -> tuple[np.ndarray, np.ndarray]:
    """CoRe's augmentation applied `data.num_views` times, then encoded: (mean, std)."""
    resolution = config.data.resolution
    expected = models.unet.config.sample_size * vae_factor(models.vae)
    if resolution % vae_factor(models.vae):
        raise InputError(
            f"data.resolution {resolution} is not a multiple of the VAE's factor "
            f"{vae_factor(models.vae)} (the model was trained at {expected})"
        )
    views = image_data.augmented_views(
        images, config.data.num_views, resolution, config.seed,
        rotate_p=config.data.rotate_p, max_angle=config.data.max_angle,
        flip_p=config.data.flip_p,
    )
    return encode_latent_pool(models.vae, models.params["vae"], views)


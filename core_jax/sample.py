"""Text-to-image sampling with a trained concept: prompts + learned vectors -> uint8 images.

SD 1.x/2.x condition the U-Net on the text encoder's last hidden state. SDXL (a pipeline with a
second text encoder) conditions it as diffusers' `StableDiffusionXLPipeline` does: both
encoders' penultimate states side by side, the second encoder's projected pooled output and the
add-time ids (original size, crop top-left, target size: the image size, no crop); the
unconditional half is zeros (SDXL base's `force_zeros_for_empty_prompt`). The learned vectors
are then [V, D1 + D2]: encoder 1's part first.

Text encoding, the whole classifier-free-guided denoising chain and the VAE decode are one
compiled program. Every weight, the learned vectors, the seed and the guidance scale are runtime
arguments, so the program is compiled once per (prompt count, images per prompt, image size,
sampler, steps, eta) and reused for other prompts, vectors, seeds and scales; XLA never folds the
weights into it as constants (DESIGN.md, performance principles 2 and 7).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from core_jax import weights
from core_jax.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    guided,
    load_schedule,
    make_schedule,
    sample,
)
from core_jax.errors import InputError
from core_jax.layer_contexts import (
    TimestepVectors,
    cross_attention_layers,
    join_layers,
    per_layer_contexts,
)
from core_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from core_jax.models.pixel import PixelSpace
from core_jax.models.presets import random_models
from core_jax.models.unet import UNet2DConditionModel
from core_jax.models.vae import AutoencoderKL
from core_jax.text import (
    add_placeholder_tokens,
    encode_per_layer,
    encode_per_layer_with_bypass,
    encode_sdxl_with_learned,
    encode_with_learned,
    load_tokenizer,
    placeholder_slots,
    placeholder_string,
    tokenize,
)

Params = dict[str, Any]


@dataclasses.dataclass(eq=False)
class Pipeline:
    """Frozen models, their weights and a tokenizer that knows the concept's placeholder tokens.

    ``placeholder_ids`` are the V ids ``add_placeholder_tokens(tokenizer, placeholder, V)``
    returned (empty for the base model alone); the learned vectors ``[V, D]`` passed to
    ``generate`` fill those positions in that order. Compiled programs are cached on the instance.
    """

    tokenizer: CLIPTokenizer
    placeholder_ids: tuple[int, ...]
    text_encoder: CLIPTextModel
    text_params: Params
    unet: UNet2DConditionModel
    unet_params: Params
    vae: AutoencoderKL | PixelSpace
    vae_params: Params
    schedule: NoiseSchedule
    placeholder: str = "<s*>"
    # SDXL's second text encoder and its tokenizer (with the same placeholder tokens); None: SD.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    text_2_params: Params | None = None
    # The text encoder's weights for classifier-free guidance's unconditional (empty) prompt;
    # None: `text_params`. A run that adapts the encoder (TextBoost) sets the frozen encoder's,
    # as the official code's precomputed null embedding keeps the unconditional branch at the
    # base model's.
    null_text_params: Params | None = None
    _encode_fn: Callable[..., jax.Array] = dataclasses.field(init=False, repr=False)
    _sample_fn: Callable[..., jax.Array] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.placeholder_ids = tuple(int(i) for i in self.placeholder_ids)
        # Only the (hashable, weightless) modules are bound; weights stay jit arguments.
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise ValueError("an SDXL pipeline needs both tokenizer_2 and text_encoder_2")
        self._encode_fn = jax.jit(
            lambda params, ids, mask, slot, learned: encode_with_learned(
                self.text_encoder, params, ids, learned, (mask, slot))
        )
        self._sample_fn = jax.jit(
            functools.partial(_sample, self.text_encoder, self.text_encoder_2, self.unet,
                              self.vae),
            static_argnames=(
                "num_inference_steps", "sampler", "eta", "images_per_prompt", "latent_hw",
                "decode",
            ),
        )

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def params(self) -> Params:
        params = {"text": self.text_params, "unet": self.unet_params, "vae": self.vae_params}
        if self.is_sdxl:
            params["text_2"] = self.text_2_params
        if self.null_text_params is not None:
            params["text_null"] = self.null_text_params
        return params

    @property
    def embed_dim(self) -> int:
        """D, the learned vectors' width: the text encoder's hidden size (SDXL: both's)."""
        width = self.text_encoder.config.hidden_size
        if self.is_sdxl:
            width += self.text_encoder_2.config.hidden_size
        return width

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_factor(self) -> int:
        """The U-Net's total downsampling: latent sides must be multiples of it."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)


def _sample(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection | None,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | PixelSpace,
    params: Params,
    schedule: NoiseSchedule,
    ids: jax.Array,
    ids_2: jax.Array | None,
    mask: jax.Array,
    slot: jax.Array,
    learned: jax.Array,
    key: jax.Array,
    guidance_scale: jax.Array,
    *,
    num_inference_steps: int,
    sampler: str,
    eta: float,
    images_per_prompt: int,
    latent_hw: tuple[int, int],
    decode: bool,
) -> jax.Array:
    """Row 0 of ids ``[1 + N, T]`` is the unconditional prompt, rows 1.. the N prompts.

    Returns ``[N * images_per_prompt, H, W, 3]`` uint8 images if ``decode``, else the final
    U-Net-scale latents ``[N * images_per_prompt, h, w, C]`` float32; prompt-major order.
    ``learned`` [L, V, D] holds vectors per cross-attention layer (XTI): each prompt is encoded
    once per layer and layer k reads encoding k (`core_jax.layer_contexts`). A
    `TimestepVectors` (NeTI's mapper) is evaluated at each step's timestep: every prompt
    encoded per layer at each step (and with the bypass, the values read their own encoding).
    """
    added = {}
    if isinstance(learned, TimestepVectors):
        if text_encoder_2 is not None:
            raise ValueError("vectors of the timestep need one text encoder (SD 1.x/2.x)")
        return _sample_timed(text_encoder, unet, vae, params, schedule, ids, mask, slot, learned,
                             key, guidance_scale, num_inference_steps=num_inference_steps,
                             sampler=sampler, eta=eta, images_per_prompt=images_per_prompt,
                             latent_hw=latent_hw, decode=decode)
    per_layer = learned.ndim == 3
    if per_layer:
        if text_encoder_2 is not None:
            raise ValueError("per-layer vectors need one text encoder (SD 1.x/2.x)")
        context = encode_per_layer(text_encoder, params["text"], ids, learned, (mask, slot))
        cond = jnp.repeat(context[:, 1:], images_per_prompt, axis=1)  # [L, N k, T, D]
        null = _null_context(text_encoder, params, ids, mask, slot, learned[0])
        uncond = jnp.broadcast_to(context[:, :1] if null is None else null, cond.shape)
    elif text_encoder_2 is None:
        null_context, context = guidance_contexts(text_encoder, params, ids, mask, slot, learned)
        cond = jnp.repeat(context, images_per_prompt, axis=0)
        uncond = jnp.broadcast_to(null_context, cond.shape)
    else:
        context, pooled = encode_sdxl_with_learned(
            text_encoder, text_encoder_2, params, ids[1:], ids_2[1:], learned,
            (mask[1:], slot[1:]))
        cond = jnp.repeat(context, images_per_prompt, axis=0)
        uncond = jnp.zeros_like(cond)
        pooled = jnp.repeat(pooled, images_per_prompt, axis=0)
        side = 2 ** (len(vae.config.block_out_channels) - 1)
        height, width = latent_hw[0] * side, latent_hw[1] * side
        time_ids = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
        added = {"text_embeds": jnp.concatenate([jnp.zeros_like(pooled), pooled]),
                 "time_ids": jnp.broadcast_to(time_ids, (2 * cond.shape[0], 6))}
    # guided()'s order: unconditional half first
    both = jnp.concatenate([uncond, cond], axis=int(per_layer))

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        if not per_layer:
            return unet.apply({"params": params["unet"]}, x, t, both, **added)
        with per_layer_contexts(cross_attention_layers(unet)):
            return unet.apply({"params": params["unet"]}, x, t, join_layers(both))

    shape = (cond.shape[-3], *latent_hw, unet.config.out_channels)
    return _draw(unet, vae, params, schedule, model_fn, shape, key, guidance_scale,
                 num_inference_steps, sampler, eta, decode)


def _null_context(
    text_encoder: CLIPTextModel, params: Params, ids: jax.Array, mask: jax.Array,
    slot: jax.Array, learned: jax.Array,
) -> jax.Array | None:
    """Row 0 (the unconditional prompt) encoded [1, T, D] by `params["text_null"]`, the
    pipeline's `null_text_params`; None where it has none. It holds no placeholder, so the
    learned vectors [V, D] change nothing."""
    if "text_null" not in params:
        return None
    return encode_with_learned(text_encoder, params["text_null"], ids[:1], learned,
                               (mask[:1], slot[:1]))


def guidance_contexts(
    text_encoder: CLIPTextModel, params: Params, ids: jax.Array, mask: jax.Array,
    slot: jax.Array, learned: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """SD 1.x/2.x's two halves of guidance: the unconditional prompt's (row 0 of ids [1 + N, T])
    context [1, T, D] and the N prompts' [N, T, D]. The prompts go through `params["text"]`;
    the unconditional prompt rides along in that call unless `params["text_null"]` (the
    pipeline's `null_text_params`, TextBoost's frozen encoder) encodes it."""
    null = _null_context(text_encoder, params, ids, mask, slot, learned)
    if null is None:
        context = encode_with_learned(text_encoder, params["text"], ids, learned, (mask, slot))
        return context[:1], context[1:]
    context = encode_with_learned(text_encoder, params["text"], ids[1:], learned,
                                  (mask[1:], slot[1:]))
    return null, context


def _draw(
    unet: UNet2DConditionModel, vae: AutoencoderKL | PixelSpace, params: Params,
    schedule: NoiseSchedule, model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    shape: tuple[int, ...], key: jax.Array, guidance_scale: jax.Array,
    num_inference_steps: int, sampler: str, eta: float, decode: bool,
) -> jax.Array:
    """The guided chain from noise of `shape` (the conditional rows) and, with `decode`, the
    images as uint8."""
    if key.ndim:  # one key per image (images_per_prompt 1, eta 0): noise as `generate` draws
        # it for that image alone, so an image does not depend on the batch it was drawn in.
        x_T = jax.vmap(lambda k: jax.random.normal(
            jax.random.split(k)[0], (1, *shape[1:]), jnp.float32)[0])(key)
        k_eta = key[0]
    else:
        k_init, k_eta = jax.random.split(key)
        x_T = jax.random.normal(k_init, shape, jnp.float32)
    latents = sample(
        guided(model_fn, guidance_scale), x_T, schedule, num_inference_steps, sampler, eta, k_eta
    )
    if not decode:
        return latents
    images = vae.apply(
        {"params": params["vae"]}, latents / vae.config.scaling_factor, method=vae.decode
    )
    # Same mapping as core_jax.data.to_uint8, done on device so only bytes come back.
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def _sample_timed(
    text_encoder: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL | PixelSpace,
    params: Params, schedule: NoiseSchedule, ids: jax.Array, mask: jax.Array, slot: jax.Array,
    learned: TimestepVectors, key: jax.Array, guidance_scale: jax.Array, *,
    num_inference_steps: int, sampler: str, eta: float, images_per_prompt: int,
    latent_hw: tuple[int, int], decode: bool,
) -> jax.Array:
    """`_sample` with vectors of the timestep: at each step the mapper gives S*'s vectors
    [L, V, D] (and bypass vectors) for that step's timestep and the prompts are encoded per
    layer; no nested dropout."""
    if "text_null" in params:
        raise ValueError("a separate encoder for the unconditional prompt with vectors of the "
                         "timestep (NeTI) is not built")
    layers = cross_attention_layers(unet)

    def contexts(t: jax.Array) -> jax.Array:  # -> [2 N k, K, T, D], unconditional half first
        truncation = {} if learned.truncation is None else {"truncation": learned.truncation}
        vectors, bypass = learned.vectors(learned.value, t[:1], None, **truncation)  # [1,L,V,D]
        rows = ids.shape[0]
        spread = lambda a: None if a is None else jnp.broadcast_to(  # noqa: E731
            a, (rows,) + a.shape[1:])
        hidden, bypassed = encode_per_layer_with_bypass(
            text_encoder, params["text"], ids, spread(vectors), (mask, slot), spread(bypass),
            learned.bypass)
        if bypassed is not None:
            hidden = jnp.concatenate([hidden, bypassed], axis=1)  # keys' L, then values' L
        cond = jnp.repeat(hidden[1:], images_per_prompt, axis=0)
        return jnp.concatenate([jnp.broadcast_to(hidden[:1], cond.shape), cond])

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:  # every row at the same step
        both = contexts(t)
        with per_layer_contexts(layers, values_apart=both.shape[1] != len(layers)):
            return unet.apply({"params": params["unet"]}, x, t,
                              join_layers(jnp.swapaxes(both, 0, 1)))

    shape = ((ids.shape[0] - 1) * images_per_prompt, *latent_hw, unet.config.out_channels)
    return _draw(unet, vae, params, schedule, model_fn, shape, key, guidance_scale,
                 num_inference_steps, sampler, eta, decode)


def _expand_placeholder(pipeline: Pipeline, prompt: str) -> str:
    """Writes each bare placeholder ("<s*>") as all V tokens ("<s*> <s*>_1 ..."), leaving
    already-expanded ones alone, as diffusers' textual-inversion loader does."""
    num_vectors = len(pipeline.placeholder_ids)
    if num_vectors < 2:
        return prompt
    full = placeholder_string(pipeline.placeholder, num_vectors)
    bare = re.escape(pipeline.placeholder) + r"(?!_\d)"
    return re.sub(f"{re.escape(full)}|{bare}", lambda _: full, prompt)


def _prompt_arrays(
    pipeline: Pipeline, prompts: Sequence[str], learned: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, slot) ``[N, 77]`` and the learned vectors ``[max(V, 1), D]`` (or, given per
    cross-attention layer, ``[L, V, D]``) float32."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    if not prompts:
        raise ValueError("prompts is empty")
    ids = tokenize(pipeline.tokenizer, [_expand_placeholder(pipeline, p) for p in prompts])
    num_vectors, dim = len(pipeline.placeholder_ids), pipeline.embed_dim
    if num_vectors:
        mask, slot = placeholder_slots(ids, pipeline.placeholder_ids)
    else:  # the base model alone
        mask, slot = np.zeros(ids.shape, bool), np.zeros(ids.shape, np.int32)
    if learned is None:
        if mask.any():
            raise ValueError("a prompt contains the placeholder but no learned vectors were given")
        # Zeros in the same shape as real vectors: the program does not depend on which it got.
        return ids, mask, slot, np.zeros((max(num_vectors, 1), dim), np.float32)
    if not num_vectors:
        raise ValueError("learned vectors given, but the pipeline has no placeholder tokens")
    if isinstance(learned, TimestepVectors):  # NeTI's mapper: checked by its own shapes
        return ids, mask, slot, learned
    learned = np.asarray(learned, np.float32)
    # Per-layer vectors (XTI): one [V, D] set per cross-attention layer.
    num_layers = len(cross_attention_layers(pipeline.unet)) if learned.ndim == 3 else "L"
    if learned.shape not in ((num_vectors, dim), (num_layers, num_vectors, dim)):
        raise ValueError(
            f"learned vectors must be [V, D] = [{num_vectors}, {dim}] or, per cross-attention "
            f"layer, [L, V, D] = [{num_layers}, {num_vectors}, {dim}]; got {learned.shape}"
        )
    return ids, mask, slot, learned


def encode_prompts(
    pipeline: Pipeline, prompts: Sequence[str], learned: np.ndarray | None = None
) -> np.ndarray:
    """Text-encoder last hidden state ``[N, 77, D]`` float32 of N prompts.

    The placeholder ("<s*>", standing for all V tokens, or written out as ``placeholder_string``)
    takes the learned vectors ``[V, D]``; ``learned`` may be None only if no prompt has it.
    """
    ids, mask, slot, learned = _prompt_arrays(pipeline, prompts, learned)
    if learned.ndim != 2:
        raise ValueError("encode_prompts takes [V, D] vectors; per-layer ones give one encoding "
                         "per layer (core_jax.text.encode_per_layer)")
    return np.asarray(pipeline._encode_fn(pipeline.text_params, ids, mask, slot, learned))


def _latent_hw(pipeline: Pipeline, height: int | None, width: int | None) -> tuple[int, int]:
    vae_factor, unet_factor = pipeline.vae_factor, pipeline.unet_factor
    default = pipeline.unet.config.sample_size * vae_factor
    height = default if height is None else height
    width = default if width is None else width
    if height <= 0 or width <= 0 or height % vae_factor or width % vae_factor:
        raise ValueError(
            f"height and width must be positive multiples of the VAE factor {vae_factor}, "
            f"got height={height}, width={width}"
        )
    latent_hw = (height // vae_factor, width // vae_factor)
    # Our U-Net's skip connections need every downsampled size exact (diffusers pads instead).
    if latent_hw[0] % unet_factor or latent_hw[1] % unet_factor:
        raise ValueError(
            f"height and width must be multiples of {vae_factor * unet_factor} (VAE factor "
            f"{vae_factor} x U-Net factor {unet_factor}), got height={height}, width={width}"
        )
    return latent_hw


def _second_ids(pipeline: Pipeline, prompts: Sequence[str], mask: np.ndarray) -> np.ndarray | None:
    """SDXL: the prompts' ids from the second tokenizer, its placeholders where the first's are
    (`mask`); None for SD 1.x/2.x."""
    if not pipeline.is_sdxl:
        return None
    ids_2 = tokenize(pipeline.tokenizer_2, [_expand_placeholder(pipeline, p) for p in prompts])
    if pipeline.placeholder_ids and not np.array_equal(
            placeholder_slots(ids_2, pipeline.placeholder_ids)[0], mask):
        raise ValueError("tokenizer_2 places the placeholder tokens elsewhere than tokenizer; "
                         "add the same placeholder tokens to both")
    return ids_2


def _run(
    pipeline: Pipeline,
    prompts: Sequence[str],
    learned: np.ndarray | None,
    *,
    num_images_per_prompt: int,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    height: int | None,
    width: int | None,
    eta: float,
    decode: bool,
) -> np.ndarray:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    latent_hw = _latent_hw(pipeline, height, width)
    prompts = [""] + list(prompts)
    ids, mask, slot, learned = _prompt_arrays(pipeline, prompts, learned)
    ids_2 = _second_ids(pipeline, prompts, mask)
    out = pipeline._sample_fn(
        pipeline.params, pipeline.schedule, ids, ids_2, mask, slot, learned, jax.random.key(seed),
        jnp.float32(guidance_scale), num_inference_steps=steps, sampler=sampler,
        eta=float(eta), images_per_prompt=num_images_per_prompt, latent_hw=latent_hw,
        decode=decode,
    )
    return np.asarray(out)


def generate(
    pipeline: Pipeline,
    prompts: Sequence[str],
    learned: np.ndarray | None = None,
    *,
    num_images_per_prompt: int = 1,
    steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """Images ``[N * num_images_per_prompt, H, W, 3]`` uint8 for N prompts, prompt-major.

    Classifier-free guidance against the empty prompt, both halves in one U-Net call per step.
    ``learned`` ``[V, D]`` fills the placeholder positions (see ``encode_prompts``); ``[L, V, D]``
    gives each cross-attention layer its own (XTI, `load_xti_embeds`). ``height`` /
    ``width`` default to the U-Net's ``sample_size`` times the VAE factor. The result depends only
    on the arguments: the initial noise and DDIM's ``eta`` noise come from ``seed``.
    """
    return _run(
        pipeline, prompts, learned, num_images_per_prompt=num_images_per_prompt, steps=steps,
        sampler=sampler, guidance_scale=guidance_scale, seed=seed, height=height, width=width,
        eta=eta, decode=True,
    )


def generate_latents(
    pipeline: Pipeline,
    prompts: Sequence[str],
    learned: np.ndarray | None = None,
    *,
    num_images_per_prompt: int = 1,
    steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """``generate`` without the decode: final latents ``[N * k, h, w, C]`` float32, U-Net scale
    (divide by ``vae.config.scaling_factor`` before ``AutoencoderKL.decode``).

    The initial noise is ``jax.random.normal(jax.random.split(jax.random.key(seed))[0],
    [N * k, h, w, C])``.
    """
    return _run(
        pipeline, prompts, learned, num_images_per_prompt=num_images_per_prompt, steps=steps,
        sampler=sampler, guidance_scale=guidance_scale, seed=seed, height=height, width=width,
        eta=eta, decode=False,
    )


def load_sdxl_pipeline(
    folder: str | Path, placeholder: str = "<s*>", num_vectors: int = 1,
    dtype: jnp.dtype = jnp.float32, pooling: str = "end_of_text",
) -> Pipeline:
    """An SDXL diffusers folder as a pipeline whose two tokenizers know the concept's
    placeholder tokens (`num_vectors` of them; 0 for the base model alone); SD's noise schedule
    unless the folder's scheduler says otherwise (`core_jax.diffusion.load_schedule`);
    `pooling` as `weights.load_sdxl` takes it."""
    folder = Path(folder)
    models = weights.load_sdxl(folder, dtype, pooling=pooling)
    tokenizer = load_tokenizer(folder)
    tokenizer_2 = load_tokenizer(folder, "tokenizer_2")
    ids = []
    if num_vectors:
        ids = add_placeholder_tokens(tokenizer, placeholder, num_vectors)
        if add_placeholder_tokens(tokenizer_2, placeholder, num_vectors) != ids:
            raise InputError(f"{folder}: the two tokenizers give the placeholder different ids")
    return Pipeline(
        tokenizer, tuple(ids), models.text_encoder, models.params["text"], models.unet,
        models.params["unet"], models.vae, models.params["vae"], load_schedule(folder),
        placeholder=placeholder, tokenizer_2=tokenizer_2, text_encoder_2=models.text_encoder_2,
        text_2_params=models.params["text_2"],
    )


def generate_seeded(
    pipeline: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    learned: np.ndarray | None = None,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """One image ``[N, H, W, 3]`` uint8 per prompt, image i drawn from ``seeds[i]`` alone: it is
    ``generate(pipeline, [prompts[i]], learned, seed=seeds[i])`` whatever else is in the batch
    (deterministic samplers only, eta 0). Seeds are in [0, 2**31)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    latent_hw = _latent_hw(pipeline, height, width)
    ids, mask, slot, learned = _prompt_arrays(pipeline, [""] + list(prompts), learned)
    ids_2 = _second_ids(pipeline, [""] + list(prompts), mask)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.int64), jnp.uint32))
    out = pipeline._sample_fn(
        pipeline.params, pipeline.schedule, ids, ids_2, mask, slot, learned, keys,
        jnp.float32(guidance_scale), num_inference_steps=steps, sampler=sampler, eta=0.0,
        images_per_prompt=1, latent_hw=latent_hw, decode=True,
    )
    return np.asarray(out)


def random_pipeline(preset: str = "tiny", seed: int = 0, num_vectors: int = 1) -> Pipeline:
    """A pipeline of ``core_jax.models.presets`` shapes with random weights and the "<s*>"
    placeholder of ``num_vectors`` tokens, for tests and demos; SD's noise schedule."""
    models = random_models(preset, seed)
    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", num_vectors)
    return Pipeline(
        tokenizer=tokenizer,
        placeholder="<s*>",
        placeholder_ids=tuple(placeholder_ids),
        text_encoder=models.text_encoder,
        text_params=models.params["text"],
        unet=models.unet,
        unet_params=models.params["unet"],
        vae=models.vae,
        vae_params=models.params["vae"],
        schedule=make_schedule(),
    )

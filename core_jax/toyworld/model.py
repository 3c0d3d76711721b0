"""The toy text-to-image model: our CLIP text encoder and a pixel-space U-Net, pretrained on
the toy world from scratch, saved as a diffusers-style folder that `core-jax train` loads.

Pixel space: the U-Net denoises 32x32 RGB images in [-1, 1] directly (3 channels in and out)
and the folder has no `vae/`, which `core_jax.train.setup` reads as "the latents are the
images" (`core_jax.models.pixel.PixelSpace`). Cosine noise schedule with v-prediction: at 32
pixels the images are near-pure noise early in the chain, where an epsilon model's x0 estimate
divides by a vanishing alpha.

The text encoder trains jointly with the U-Net. A frozen random one would also condition the
U-Net, but then a word's embedding would mean nothing by itself: the super-category word that
Textual Inversion and CoRe start the concept's vector from, and the text-feature space where
CoRe's embedding regularizer and the hinge/pairwise terms measure distances, would carry no
knowledge of the world. Trained jointly, "star" is a star in the encoder as it is in real CLIP.
It costs little: a two-layer, 32-wide encoder next to the U-Net.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from transformers import CLIPTokenizer

from core_jax import weights
from core_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    load_schedule,
    sample_timesteps,
    schedule_from_config,
    training_target,
)
from core_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from core_jax.models.pixel import PixelSpace
from core_jax.models.unet import UNet2DConditionModel, UNetConfig
from core_jax.sample import Pipeline, generate
from core_jax.text import clip_tokenizer_dir, load_templates, load_tokenizer, tokenize
from core_jax.toyworld import TEMPLATES
from core_jax.toyworld.classifier import accuracy, predict
from core_jax.toyworld.world import (
    ATTRIBUTES,
    HELD_OUT_IDENTITIES,
    HELD_OUT_SHAPE,
    SHAPES,
    Identity,
    Scenes,
    caption,
    random_captions,
    render_with_masks,
    sample_scenes,
)

Params = dict[str, Any]
RESOLUTION = 32
PRETRAINING_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)

TEXT_CONFIG = CLIPTextConfig(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=64,
)
# XLA:CPU runs narrow convolutions at a fraction of its matmul speed, and a 32-pixel level costs
# 4x a 16-pixel one: the 32-pixel level is kept narrow (16 channels) and has no attention. Cross-
# attention sits at 16x16 (where an object is 8-20 pixels across and its colour and pattern are
# drawn), 8x8 and 4x4: 10 cross-attention layers (3 down, 1 mid, 6 up). With attention only at
# 8x8 and below, a 1800-step model learnt backgrounds (0.96) but drew every object as a
# many-coloured blob (colour and shape at chance).
UNET_CONFIG = UNetConfig(
    sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64, 128),
    down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"
    ),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_CONFIG.hidden_size,
    attention_head_dim=4,
)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000  # the shipped model: 3000, then 3000 more at half the rate (RESULTS.md)
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    keep_p: float = 0.85  # each attribute's chance of being named in a caption
    uncond_p: float = 0.1  # empty captions, for classifier-free guidance
    ema_decay: float = 0.995
    # Object pixels count 1 + object_weight times as much as background pixels in the loss. The
    # background fills 60-90 % of an image and is learnt first; the object, what personalization
    # is about, would otherwise stay a blur for thousands of steps.
    object_weight: float = 4.0
    seed: int = 0


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # {"text": ..., "unet": ...}
    ema: Params
    opt_state: Any
    key: jax.Array


def pretraining_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """The world the toy model sees: no held-out identity, no held-out shape."""
    return sample_scenes(rng, n, exclude=HELD_OUT_IDENTITIES, shapes=PRETRAINING_SHAPES)


def training_batch(
    rng: np.random.Generator, tokenizer: CLIPTokenizer, config: PretrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32 [B, 32, 32, 3] in [-1, 1], loss weights [B, 32, 32, 1], caption ids
    [B, 77])."""
    scenes = pretraining_scenes(rng, config.batch_size)
    images, masks = render_with_masks(scenes, RESOLUTION, rng)
    images = images.astype(np.float32) / 127.5 - 1.0
    weights = (1.0 + config.object_weight * masks)[..., None]
    captions = random_captions(scenes, rng, config.keep_p)
    drop = rng.random(len(captions)) < config.uncond_p
    captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
    return images, weights, tokenize(tokenizer, captions)


def _make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps, end_value=0.0
    )
    # No weight decay: it would shrink the ~49k token rows the world never uses towards zero.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _train_step(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    optimizer: optax.GradientTransformation,
    config: PretrainConfig,
    state: TrainState,
    schedule: NoiseSchedule,
    images: jax.Array,
    pixel_weights: jax.Array,
    ids: jax.Array,
) -> tuple[TrainState, jax.Array]:
    key, k_t, k_noise = jax.random.split(state.key, 3)
    t = sample_timesteps(k_t, images.shape[0], schedule)
    noise = jax.random.normal(k_noise, images.shape)
    x_t = add_noise(schedule, images, noise, t)
    target = training_target(schedule, images, noise, t)

    def loss_fn(params: Params) -> jax.Array:
        context = text_encoder.apply({"params": params["text"]}, ids).last_hidden_state
        pred = unet.apply({"params": params["unet"]}, x_t, t, context)
        return jnp.mean(pixel_weights * jnp.square(pred - target)) / jnp.mean(pixel_weights)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA with a warm-up, so that short runs are not dominated by their first steps.
    decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    return TrainState(state.step + 1, params, ema, opt_state, key), loss


def init_models(seed: int) -> tuple[CLIPTextModel, UNet2DConditionModel, Params]:
    text_encoder, unet = CLIPTextModel(TEXT_CONFIG), UNet2DConditionModel(UNET_CONFIG)
    k_text, k_unet = jax.random.split(jax.random.key(seed))
    ids = jnp.zeros((1, TEXT_CONFIG.max_position_embeddings), jnp.int32)
    x = jnp.zeros((1, RESOLUTION, RESOLUTION, 3))
    context = jnp.zeros((1, 1, TEXT_CONFIG.hidden_size))
    params = {
        "text": text_encoder.init(k_text, ids)["params"],
        "unet": unet.init(k_unet, x, jnp.zeros((1,)), context)["params"],
    }
    return text_encoder, unet, params


def pretrain(
    config: PretrainConfig = PretrainConfig(),
    log: Callable[[str], None] | None = print,
    start_from: str | Path | None = None,
) -> tuple[CLIPTextModel, UNet2DConditionModel, Params, list[float]]:
    """Train on fresh world samples, from scratch or from the weights of a saved toy folder
    (`start_from`; fresh optimizer, EMA starting at those weights); returns the EMA weights and
    the loss curve."""
    text_encoder, unet, params = init_models(config.seed)
    if start_from is not None:
        params = {
            "text": weights.load_text_encoder(start_from)[1],
            "unet": weights.load_unet(start_from)[1],
        }
    optimizer = _make_optimizer(config)
    schedule = schedule_from_config(SCHEDULER_CONFIG)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
        optimizer.init(params), jax.random.key(config.seed),
    )
    step = jax.jit(
        functools.partial(_train_step, text_encoder, unet, optimizer, config), donate_argnums=0
    )
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(config.seed)
    curve: list[float] = []
    start = time.perf_counter()
    batch = training_batch(rng, tokenizer, config)
    for i in range(1, config.steps + 1):
        state, loss = step(state, schedule, *batch)
        # Drawn while the step runs (dispatch is asynchronous).
        batch = training_batch(rng, tokenizer, config)
        curve.append(float(loss))
        if log and (i % 100 == 0 or i == config.steps):
            recent = np.mean(curve[-100:])
            log(f"step {i}/{config.steps}: loss {recent:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return text_encoder, unet, jax.device_get(state.ema), curve


def _to_float16(path: Path) -> None:
    """Rewrite a safetensors file in float16: half the bytes in the package, and every loader
    here reads float16 back to float32."""
    from safetensors.numpy import load_file, save_file

    state = {k: v.astype(np.float16) for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})


def world_token_ids(tokenizer: CLIPTokenizer) -> np.ndarray:
    """Every token id a toy-world caption or context template can produce (with start/end)."""
    longest = max(len(values) for values in ATTRIBUTES.values())
    texts = [caption({a: v[i % len(v)] for a, v in ATTRIBUTES.items()}) for i in range(longest)]
    texts += [line.replace("{}", "") for line in load_templates(TEMPLATES)]
    return np.unique(np.concatenate([tokenizer(text).input_ids for text in texts]))


def _zero_unused_token_rows(params: Params, tokenizer: CLIPTokenizer) -> Params:
    """The ~49k rows of the token table that no toy caption uses never got a gradient: they
    are their random initial values, meaningless to the model. Zeroed, they compress to almost
    nothing in git and in the wheel (a shipped model of a few MB instead of 16)."""
    table = params["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    keep = np.zeros(table.shape[0], bool)
    keep[world_token_ids(tokenizer)] = True
    zeroed = np.where(keep[:, None], np.asarray(table), 0.0).astype(table.dtype)
    text = jax.tree.map(lambda x: x, params["text"])
    text["text_model"]["embeddings"]["token_embedding"]["embedding"] = zeroed
    return {**params, "text": text}


def save_toy_model(
    folder: str | Path,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    params: Params,
    info: dict[str, Any],
) -> Path:
    """A diffusers-style folder: text_encoder/, unet/, tokenizer/, scheduler/ (no vae/: pixel
    space), weights in float16, and toyworld.json saying how it was made and what it never saw."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    params = _zero_unused_token_rows(params, load_tokenizer())
    _to_float16(
        weights.save_text_encoder(folder / "text_encoder", text_encoder, params["text"])
        / "model.safetensors"
    )
    _to_float16(
        weights.save_unet(folder / "unet", unet, params["unet"])
        / "diffusion_pytorch_model.safetensors"
    )
    (folder / "tokenizer").mkdir()
    for file in Path(clip_tokenizer_dir()).iterdir():
        shutil.copyfile(file, folder / "tokenizer" / file.name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SCHEDULER_CONFIG, indent=2)
    )
    held_out = {
        "shape": HELD_OUT_SHAPE,
        "identities": [i.words for i in HELD_OUT_IDENTITIES],
    }
    (folder / "toyworld.json").write_text(json.dumps({**info, "held_out": held_out}, indent=2))
    return folder


def load_pipeline(folder: str | Path) -> Pipeline:
    """The base model of a toy folder, ready for `core_jax.sample.generate` (no placeholder)."""
    folder = Path(folder)
    text_encoder, text_params = weights.load_text_encoder(folder)
    unet, unet_params = weights.load_unet(folder)
    return Pipeline(
        tokenizer=load_tokenizer(folder), placeholder_ids=(), text_encoder=text_encoder,
        text_params=text_params, unet=unet, unet_params=unet_params, vae=PixelSpace(),
        vae_params={}, schedule=load_schedule(folder),
    )


def prompt_following(
    pipeline: Pipeline,
    classifier_params: Params,
    scenes: Scenes,
    *,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Generate each scene from its full caption and score with the classifiers: per-attribute
    accuracy of what was drawn against what was asked."""
    prompts = [caption(scenes.row(i)) for i in range(len(scenes))]
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape, one compilation
        out = generate(
            pipeline, chunk, steps=steps, guidance_scale=guidance_scale, seed=seed + start
        )
        images.append(out[: min(batch_size, len(prompts) - start)])
    return accuracy(predict(classifier_params, np.concatenate(images)), scenes)


def evaluation_scenes(
    rng: np.random.Generator, n: int, identities: Sequence[Identity] | None = None
) -> Scenes:
    """n scenes of the pretraining world, or of the given identities (cycled) in random
    contexts: held-out identities test composition of words never seen together."""
    if identities is None:
        return pretraining_scenes(rng, n)
    rows = []
    for i in range(n):
        identity = identities[i % len(identities)]
        fixed = {"shape": identity.shape, "colour": identity.colour, "pattern": identity.pattern}
        rows.append(sample_scenes(rng, 1, fixed=fixed).row(0))
    return Scenes.from_words(rows)

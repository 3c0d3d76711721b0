"""The toy model v2: a toy text-to-image model meant to draw the world well enough to measure with.

What changed from v1 (`model.py`, which stays the shipped default) and why:

- Text encoder 4 layers x 128 wide (v1: 2 x 64), so that a learned word passes through enough
  attention layers to pull its neighbours' features towards itself, as it does in CLIP.
- U-Net twice as wide at 32 and 16 pixels, where shapes' outlines live (v1 drew shapes at
  about twice chance), cross-attention at 16, 8 and 4 pixels as in v1.
- Coordinate channels (`core_jax.models.pixel.with_coordinates`): the U-Net takes 5 channels,
  the noisy RGB image plus each pixel's x and y, and predicts 3. v1 drew position at chance: a
  convolutional U-Net can only tell left from right through zero padding at the borders.
- Loss weights: object pixels 1 + 4 as in v1, plus a band around the object's outline (+4),
  where shape is decided.
- Warmup-stable-decay learning rate (constant after warmup, linear decay over the last steps):
  training spans several sessions of unknown length, and a constant rate can be extended by
  raising `steps` on resume; the decay gives the final sharpening.
- 48 held-out identities (`world.TEST_IDENTITIES`, `world.VALIDATION_IDENTITIES`) and the moon.
- The text encoder trains on a compact token table holding only the world's tokens (70 rows
  instead of 49408): the full table's Adam state and gradient cost time every step and make
  checkpoints 100 MB. `export` writes it back into a full CLIP-vocabulary table (other rows
  zero), so the saved folder is an ordinary diffusers-style text encoder.

Training state (weights, EMA, Adam) is one msgpack file written atomically every few minutes;
rerunning the same command resumes from it. Every random draw is a function of (seed, step), so
a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from transformers import CLIPTokenizer

from core_jax import weights
from core_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    guided,
    sample,
    sample_timesteps,
    schedule_from_config,
    training_target,
)
from core_jax.files import atomic_write_bytes
from core_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from core_jax.models.pixel import COORDINATE_CHANNELS, with_coordinates
from core_jax.models.unet import UNet2DConditionModel, UNetConfig
from core_jax.text import clip_tokenizer_dir, load_tokenizer, tokenize
from core_jax.toyworld.classifier import accuracy, predict
from core_jax.toyworld.model import SCHEDULER_CONFIG, _to_float16
from core_jax.toyworld.world import (
    ATTRIBUTES,
    HELD_OUT_SHAPE,
    SHAPES,
    TEST_IDENTITIES,
    V2_HELD_OUT_IDENTITIES,
    VALIDATION_IDENTITIES,
    Identity,
    Scenes,
    caption,
    random_captions,
    render_with_masks,
    sample_scenes,
)

Params = dict[str, Any]
RESOLUTION = 32
EARLY_EVALUATIONS = (250, 500)  # besides every eval_every steps: the start of the curve
PRETRAINING_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)

TEXT_CONFIG = CLIPTextConfig(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    projection_dim=128,
)
UNET_CONFIG = UNetConfig(
    sample_size=RESOLUTION, in_channels=3 + COORDINATE_CHANNELS, out_channels=3,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"
    ),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_CONFIG.hidden_size,
    attention_head_dim=4,
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The two networks' shapes (the text config with the full CLIP vocabulary)."""

    text: CLIPTextConfig = TEXT_CONFIG
    unet: UNetConfig = UNET_CONFIG


@dataclasses.dataclass(frozen=True)
class PretrainConfigV2:
    steps: int = 20000  # the end of the schedule; raise it on resume before the decay starts
    decay_steps: int = 4000  # linear decay to 0 over the last decay_steps
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    keep_p: float = 0.85  # each attribute's chance of being named in a caption
    uncond_p: float = 0.1  # empty captions, for classifier-free guidance
    ema_decay: float = 0.999
    object_weight: float = 4.0
    edge_weight: float = 4.0  # extra weight on a 3-pixel band around the object's outline
    seed: int = 0


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # {"text": ..., "unet": ...}; the text token table is the compact one
    ema: Params
    opt_state: Any


# --- The world's vocabulary --------------------------------------------------------------------


def world_vocabulary(tokenizer: CLIPTokenizer) -> np.ndarray:
    """Sorted CLIP token ids of every word a toy-world caption can use, start, end and padding
    (end-of-text, the largest id, stays last: the compact ids keep the order)."""
    longest = max(len(values) for values in ATTRIBUTES.values())
    texts = [caption({a: v[i % len(v)] for a, v in ATTRIBUTES.items()}) for i in range(longest)]
    texts.append("")
    ids = np.concatenate([tokenize(tokenizer, [t])[0] for t in texts])
    return np.unique(ids).astype(np.int32)


def compact_ids(vocabulary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """CLIP ids -> indices into the compact table; every id must be in the vocabulary."""
    index = np.searchsorted(vocabulary, ids)
    index = np.clip(index, 0, len(vocabulary) - 1)
    if not np.array_equal(vocabulary[index], ids):
        raise ValueError("a caption uses a token outside the toy world's vocabulary")
    return index.astype(np.int32)


def compact_text_config(
    vocabulary: np.ndarray, text_config: CLIPTextConfig = TEXT_CONFIG
) -> CLIPTextConfig:
    return dataclasses.replace(
        text_config, vocab_size=len(vocabulary),
        eos_token_id=int(compact_ids(vocabulary, np.array([text_config.eos_token_id]))[0]),
    )


def full_text_params(
    compact: Params, vocabulary: np.ndarray, vocab_size: int = TEXT_CONFIG.vocab_size
) -> Params:
    """The compact text encoder's weights with its token table written into a full CLIP table
    (rows of words outside the world zero)."""
    table = np.asarray(compact["text_model"]["embeddings"]["token_embedding"]["embedding"])
    full = np.zeros((vocab_size, table.shape[1]), table.dtype)
    full[vocabulary] = table
    params = jax.tree.map(np.asarray, compact)
    params["text_model"]["embeddings"]["token_embedding"]["embedding"] = full
    return params


# --- Data --------------------------------------------------------------------------------------


def pretraining_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """The world the v2 model sees: none of the 48 held-out identities, no moon."""
    return sample_scenes(rng, n, exclude=V2_HELD_OUT_IDENTITIES, shapes=PRETRAINING_SHAPES)


def _band(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Where a [B, S, S] coverage mask changes within `radius` pixels: the outline's band."""
    padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    s = mask.shape[1]
    shifts = [padded[:, i : i + s, j : j + s]
              for i in range(2 * radius + 1) for j in range(2 * radius + 1)]
    return np.max(shifts, axis=0) - np.min(shifts, axis=0)


def training_batch(
    rng: np.random.Generator, tokenizer: CLIPTokenizer, vocabulary: np.ndarray,
    config: PretrainConfigV2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images float32 [B, 32, 32, 3] in [-1, 1], loss weights [B, 32, 32, 1], compact caption
    ids [B, 77], the captions)."""
    scenes = pretraining_scenes(rng, config.batch_size)
    images, masks = render_with_masks(scenes, RESOLUTION, rng)
    images = images.astype(np.float32) / 127.5 - 1.0
    pixel_weights = 1.0 + config.object_weight * masks + config.edge_weight * _band(masks)
    captions = random_captions(scenes, rng, config.keep_p)
    drop = rng.random(len(captions)) < config.uncond_p
    captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
    ids = compact_ids(vocabulary, tokenize(tokenizer, captions))
    return images, pixel_weights[..., None].astype(np.float32), ids, captions


# --- Training ----------------------------------------------------------------------------------


def learning_rate_schedule(config: PretrainConfigV2) -> optax.Schedule:
    """Linear warmup, constant, linear decay to 0 over the last decay_steps."""
    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / config.warmup_steps)
        decay = jnp.clip((config.steps - step) / config.decay_steps, 0.0, 1.0)
        return config.learning_rate * jnp.minimum(warm, decay)
    return schedule


def make_optimizer(config: PretrainConfigV2) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(learning_rate_schedule(config))
    )


def init_models(
    seed: int, vocabulary: np.ndarray, architecture: Architecture = Architecture()
) -> tuple[CLIPTextModel, UNet2DConditionModel, Params]:
    """The compact-vocabulary text encoder, the U-Net and their initial weights."""
    text_config, unet_config = architecture.text, architecture.unet
    text_encoder = CLIPTextModel(compact_text_config(vocabulary, text_config))
    unet = UNet2DConditionModel(unet_config)
    k_text, k_unet = jax.random.split(jax.random.key(seed))
    ids = jnp.zeros((1, text_config.max_position_embeddings), jnp.int32)
    x = jnp.zeros((1, RESOLUTION, RESOLUTION, unet_config.in_channels))
    context = jnp.zeros((1, 1, text_config.hidden_size))
    params = {
        "text": text_encoder.init(k_text, ids)["params"],
        "unet": unet.init(k_unet, x, jnp.zeros((1,)), context)["params"],
    }
    return text_encoder, unet, params


def _train_step(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    optimizer: optax.GradientTransformation,
    config: PretrainConfigV2,
    state: TrainState,
    schedule: NoiseSchedule,
    key: jax.Array,
    images: jax.Array,
    pixel_weights: jax.Array,
    ids: jax.Array,
) -> tuple[TrainState, jax.Array]:
    k_t, k_noise = jax.random.split(key)
    t = sample_timesteps(k_t, images.shape[0], schedule)
    noise = jax.random.normal(k_noise, images.shape)
    x_t = add_noise(schedule, images, noise, t)
    target = training_target(schedule, images, noise, t)
    unet_in = with_coordinates(x_t, unet.config.in_channels)

    def loss_fn(params: Params) -> jax.Array:
        context = text_encoder.apply({"params": params["text"]}, ids).last_hidden_state
        pred = unet.apply({"params": params["unet"]}, unet_in, t, context)
        return jnp.mean(pixel_weights * jnp.square(pred - target)) / jnp.mean(pixel_weights)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    return TrainState(state.step + 1, params, ema, opt_state), loss


# --- Sampling and evaluation --------------------------------------------------------------------


@dataclasses.dataclass
class Sampler:
    """Classifier-free-guided DDIM for the compact-vocabulary model (coordinate channels
    appended at every U-Net call); one compiled chain per batch size."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    schedule: NoiseSchedule
    tokenizer: CLIPTokenizer
    vocabulary: np.ndarray
    steps: int = 25
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        self._chain = jax.jit(self._run)

    def _run(self, params: Params, ids: jax.Array, key: jax.Array) -> jax.Array:
        context = self.text_encoder.apply({"params": params["text"]}, ids).last_hidden_state
        cond, uncond = context[1:], jnp.broadcast_to(context[:1], context[1:].shape)
        both = jnp.concatenate([uncond, cond])
        in_channels = self.unet.config.in_channels

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return self.unet.apply(
                {"params": params["unet"]}, with_coordinates(x, in_channels), t, both
            )

        shape = (cond.shape[0], RESOLUTION, RESOLUTION, self.unet.config.out_channels)
        x_T = jax.random.normal(key, shape)
        x0 = sample(guided(model_fn, self.guidance_scale), x_T, self.schedule, self.steps)
        return jnp.round((jnp.clip(x0, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)

    def __call__(self, params: Params, prompts: Sequence[str], seed: int = 0) -> np.ndarray:
        ids = compact_ids(self.vocabulary, tokenize(self.tokenizer, ["", *prompts]))
        return np.asarray(self._chain(params, ids, jax.random.key(seed)))


def evaluation_scenes(
    rng: np.random.Generator, n: int, identities: Sequence[Identity] | None = None
) -> Scenes:
    """n scenes of the pretraining world, or of the given identities (cycled) in random
    contexts."""
    if identities is None:
        return pretraining_scenes(rng, n)
    rows = []
    for i in range(n):
        identity = identities[i % len(identities)]
        fixed = {"shape": identity.shape, "colour": identity.colour, "pattern": identity.pattern}
        rows.append(sample_scenes(rng, 1, fixed=fixed).row(0))
    return Scenes.from_words(rows)


def evaluation_sets(per_identity: int = 3, seen: int = 64, seed: int = 1234) -> dict[str, Scenes]:
    """The fixed scenes every evaluation draws: each held-out identity per_identity times in
    random contexts (test and validation apart), and `seen` scenes of the pretraining world."""
    rng = np.random.default_rng(seed)
    return {
        "test": evaluation_scenes(rng, per_identity * len(TEST_IDENTITIES), TEST_IDENTITIES),
        "validation": evaluation_scenes(
            rng, per_identity * len(VALIDATION_IDENTITIES), VALIDATION_IDENTITIES
        ),
        "seen": evaluation_scenes(rng, seen),
    }


def prompt_following(
    sampler: Sampler, params: Params, classifier_params: Params, sets: dict[str, Scenes],
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each set's scenes drawn from their full captions, in one sampling batch, and read back
    by the classifiers: per-attribute accuracy per set, and "held_out" (test and validation)."""
    names = list(sets)
    prompts = [caption(sets[k].row(i)) for k in names for i in range(len(sets[k]))]
    images = sampler(params, prompts, seed)
    predicted = predict(classifier_params, images)
    out, start = {}, 0
    for k in names:
        n = len(sets[k])
        out[k] = accuracy({a: v[start : start + n] for a, v in predicted.items()}, sets[k])
        start += n
    if "test" in out and "validation" in out:
        n_t, n_v = len(sets["test"]), len(sets["validation"])
        out["held_out"] = {a: (out["test"][a] * n_t + out["validation"][a] * n_v) / (n_t + n_v)
                           for a in ATTRIBUTES}
    return out


# --- Checkpoints and export ---------------------------------------------------------------------


def save_checkpoint(path: Path, state: TrainState, extra: dict[str, Any]) -> None:
    """The training state as msgpack, and `extra` (JSON) beside it; the previous checkpoint is
    kept as `<name>.prev` until the new one is complete."""
    data = serialization.to_bytes(jax.device_get(state))
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(extra, indent=2).encode())


def load_checkpoint(path: Path, template: TrainState) -> TrainState:
    for candidate in (path, path.with_name(path.name + ".prev")):
        if candidate.exists():
            try:
                return serialization.from_bytes(template, candidate.read_bytes())
            except Exception as error:  # a torn file: fall back to the previous one
                print(f"could not read {candidate}: {error}")
    raise FileNotFoundError(path)


def export(
    folder: str | Path,
    params: Params,
    vocabulary: np.ndarray,
    info: dict[str, Any],
    architecture: Architecture = Architecture(),
) -> Path:
    """A diffusers-style folder (text_encoder/ with the full CLIP table, unet/ with 5 input
    channels, tokenizer/, scheduler/, no vae/), weights in float16, and toyworld.json."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    text_encoder = CLIPTextModel(architecture.text)
    unet = UNet2DConditionModel(architecture.unet)
    text = full_text_params(params["text"], vocabulary, architecture.text.vocab_size)
    _to_float16(weights.save_text_encoder(staging / "text_encoder", text_encoder, text)
                / "model.safetensors")
    _to_float16(weights.save_unet(staging / "unet", unet, jax.device_get(params["unet"]))
                / "diffusion_pytorch_model.safetensors")
    (staging / "tokenizer").mkdir()
    for file in Path(clip_tokenizer_dir()).iterdir():
        shutil.copyfile(file, staging / "tokenizer" / file.name)
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SCHEDULER_CONFIG, indent=2)
    )
    held_out = {
        "shape": HELD_OUT_SHAPE,
        "test_identities": [i.words for i in TEST_IDENTITIES],
        "validation_identities": [i.words for i in VALIDATION_IDENTITIES],
    }
    coordinates = {"coordinate_channels": COORDINATE_CHANNELS,
                   "note": "append core_jax.models.pixel.with_coordinates before each U-Net call"}
    (staging / "toyworld.json").write_text(
        json.dumps({**info, "unet_input": coordinates, "held_out": held_out}, indent=2)
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


# --- The run -------------------------------------------------------------------------------------


def _log_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def pretrain(
    run_dir: str | Path,
    config: PretrainConfigV2,
    classifier_params: Params,
    *,
    eval_every: int = 1000,
    checkpoint_every_s: float = 300.0,
    stop_after_s: float | None = None,
    log: Callable[[str], None] = print,
    architecture: Architecture = Architecture(),
    eval_sets: dict[str, Scenes] | None = None,
) -> TrainState:
    """Train into run_dir (resuming from its checkpoint if any) until config.steps; writes
    checkpoint.msgpack (+ .json), metrics.jsonl (loss every 100 steps, prompt following every
    eval_every steps) and model/ (the EMA weights exported at each evaluation)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RuntimeError(f"another process is training in {run_dir}") from error
        return _pretrain_locked(
            run_dir, config, classifier_params, eval_every, checkpoint_every_s, stop_after_s, log,
            architecture, evaluation_sets() if eval_sets is None else eval_sets,
        )


def _pretrain_locked(
    run_dir: Path,
    config: PretrainConfigV2,
    classifier_params: Params,
    eval_every: int,
    checkpoint_every_s: float,
    stop_after_s: float | None,
    log: Callable[[str], None],
    architecture: Architecture,
    sets: dict[str, Scenes],
) -> TrainState:
    tokenizer = load_tokenizer()
    vocabulary = world_vocabulary(tokenizer)
    text_encoder, unet, params = init_models(config.seed, vocabulary, architecture)
    optimizer = make_optimizer(config)
    schedule = schedule_from_config(SCHEDULER_CONFIG)
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                       optimizer.init(params))
    ckpt = run_dir / "checkpoint.msgpack"
    if ckpt.exists() or ckpt.with_name(ckpt.name + ".prev").exists():
        state = load_checkpoint(ckpt, state)
        log(f"resumed from {ckpt} at step {int(state.step)}")
    config_path = run_dir / "config.json"  # this start's settings (a resume may move steps)
    if config_path.exists() and json.loads(config_path.read_text()) != dataclasses.asdict(config):
        log(f"settings changed from {config_path.read_text()}")
    atomic_write_bytes(config_path, json.dumps(dataclasses.asdict(config), indent=2).encode())

    step_fn = jax.jit(
        functools.partial(_train_step, text_encoder, unet, optimizer, config), donate_argnums=0
    )
    sampler = Sampler(text_encoder, unet, schedule, tokenizer, vocabulary)
    base_key = jax.random.key(config.seed)
    metrics = run_dir / "metrics.jsonl"
    lr = learning_rate_schedule(config)

    stopping = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def checkpoint(reason: str) -> None:
        step = int(state.step)
        save_checkpoint(ckpt, state, {"step": step, "config": dataclasses.asdict(config),
                                      "time": time.time()})
        log(f"checkpoint at step {step} ({reason})")

    def evaluate() -> None:
        step = int(state.step)
        start = time.perf_counter()
        scores = prompt_following(sampler, state.ema, classifier_params, sets)
        record = {"step": step, "kind": "eval", "time": time.time(),
                  "eval_s": round(time.perf_counter() - start, 1), **scores}
        _log_line(metrics, record)
        log(f"eval at step {step}: held-out " + "  ".join(
            f"{a} {v:.3f}" for a, v in scores["held_out"].items()))
        export(run_dir / "model", state.ema, vocabulary,
               {"pretrain_v2": {**dataclasses.asdict(config), "step": step},
                "prompt_following": scores}, architecture)

    def batch_for(step: int):
        rng = np.random.default_rng([config.seed, step])
        return training_batch(rng, tokenizer, vocabulary, config)[:3]

    losses: list[float] = []
    # The rate counts training only: the window restarts after compiling, checkpoints and evals.
    last_ckpt, run_start = time.time(), time.time()
    window_start, window_steps = None, 0
    step0 = int(state.step)
    if step0 == 0:
        evaluate()
        last_ckpt = time.time()
    batch = batch_for(step0)
    try:
        while int(state.step) < config.steps:
            i = int(state.step)
            state, loss = step_fn(state, schedule, jax.random.fold_in(base_key, i), *batch)
            batch = batch_for(i + 1)  # drawn while the step runs
            losses.append(float(loss))
            i += 1
            if window_start is None:  # the first step compiled
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            if i % 100 == 0:
                rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
                _log_line(metrics, {"step": i, "kind": "train", "time": time.time(),
                                    "loss": float(np.mean(losses[-100:])),
                                    "lr": float(lr(i)), "steps_per_hour": round(rate * 3600)})
                log(f"step {i}/{config.steps}: loss {np.mean(losses[-100:]):.4f} "
                    f"lr {float(lr(i)):.2e} ({rate * 3600:.0f} steps/h)")
                window_start, window_steps = time.perf_counter(), 0
            if i % eval_every == 0 or i in EARLY_EVALUATIONS or i == config.steps:
                checkpoint("evaluation")
                evaluate()
                last_ckpt = time.time()
                window_start, window_steps = time.perf_counter(), 0
            elif time.time() - last_ckpt > checkpoint_every_s:
                checkpoint("timer")
                last_ckpt = time.time()
                window_start, window_steps = time.perf_counter(), 0
            if stopping or (stop_after_s and time.time() - run_start > stop_after_s):
                checkpoint("stop requested")
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    return state


def export_checkpoint(
    run_dir: str | Path, folder: str | Path, architecture: Architecture = Architecture()
) -> Path:
    """The EMA weights of run_dir's checkpoint as a model folder (see `export`)."""
    run_dir = Path(run_dir)
    config = PretrainConfigV2(**json.loads((run_dir / "config.json").read_text()))
    vocabulary = world_vocabulary(load_tokenizer())
    _, _, params = init_models(config.seed, vocabulary, architecture)
    optimizer = make_optimizer(config)
    template = TrainState(jnp.zeros((), jnp.int32), params, params, optimizer.init(params))
    state = load_checkpoint(run_dir / "checkpoint.msgpack", template)
    info: dict[str, Any] = {"pretrain_v2": {**dataclasses.asdict(config), "step": int(state.step)}}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        evals = [r for r in map(json.loads, metrics.read_text().splitlines())
                 if r["kind"] == "eval" and r["step"] <= int(state.step)]
        if evals:
            info["prompt_following"] = evals[-1]
    return export(folder, state.ema, vocabulary, info, architecture)

"""Attribute classifiers for the toy world: the stand-ins for CLIP and DINO.

One small CNN with a shared trunk and one softmax head per attribute, trained on fresh world
samples (the whole world: held-out concepts and the held-out shape included, since it judges
them). Identity is judged by the shape, colour and pattern heads; text alignment by the
background and style heads. Images of any multiple of 32 pixels are average-pooled to 32 first.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from core_jax.toyworld.world import ATTRIBUTES, Scenes, render, sample_scenes

Params = dict[str, Any]
RESOLUTION = 32


class AttributeClassifier(nn.Module):
    """uint8 or [-1, 1] float images [B, 32, 32, 3] -> logits {attribute: [B, classes]}."""

    widths: tuple[int, ...] = (16, 32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 127.5 - 1.0
        for i, width in enumerate(self.widths):
            x = nn.gelu(nn.Conv(width, (3, 3), name=f"conv{i}a")(x))
            x = nn.Conv(width, (3, 3), strides=2, name=f"conv{i}b")(x)
            x = nn.gelu(nn.GroupNorm(8, name=f"norm{i}")(x))
        # Flattened rather than pooled: position is an attribute.
        x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        return {
            name: nn.Dense(len(values), name=f"head_{name}")(x)
            for name, values in ATTRIBUTES.items()
        }


def to_classifier_resolution(images: np.ndarray) -> np.ndarray:
    """Average-pool [N, S, S, 3] images to 32 pixels (S a multiple of 32); float32 in [-1, 1]."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images
    factor = x.shape[1] // RESOLUTION
    if x.shape[1] != x.shape[2] or x.shape[1] % RESOLUTION:
        raise ValueError(f"images must be square multiples of {RESOLUTION} pixels, got {x.shape}")
    n = x.shape[0]
    return x.reshape(n, RESOLUTION, factor, RESOLUTION, factor, 3).mean(axis=(2, 4))


def _loss(module: AttributeClassifier, params: Params, images: jax.Array, labels: dict):
    logits = module.apply({"params": params}, images)
    per_head = {
        name: optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[name]).mean()
        for name in ATTRIBUTES
    }
    return sum(per_head.values()), per_head


def training_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, Scenes]:
    """n fresh scenes, a quarter drawn at 64 pixels and pooled so that 64-pixel images are
    judged as well as 32-pixel ones; float32 [n, 32, 32, 3] in [-1, 1]."""
    scenes = sample_scenes(rng, n)
    k = n // 4
    images = np.concatenate([
        to_classifier_resolution(render(scenes.take(slice(0, k)), 2 * RESOLUTION, rng)),
        to_classifier_resolution(render(scenes.take(slice(k, n)), RESOLUTION, rng)),
    ])
    return images, scenes


def train_classifier(
    steps: int = 800,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> Params:
    """Fresh world samples every step (never the same image twice); AdamW, cosine decay."""
    module = AttributeClassifier()
    rng = np.random.default_rng(seed)
    params = module.init(jax.random.key(seed), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, 100, steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Params, opt_state: Any, images: jax.Array, labels: dict):
        (loss, _), grads = jax.value_and_grad(
            functools.partial(_loss, module), has_aux=True
        )(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    for i in range(1, steps + 1):
        images, scenes = training_batch(rng, batch_size)
        params, opt_state, loss = step(params, opt_state, images, scenes.labels())
        if log and (i % 200 == 0 or i == steps):
            log(f"classifier step {i}/{steps}: loss {float(loss):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return params


@functools.cache
def _predict_fn() -> Callable[[Params, jax.Array], dict[str, jax.Array]]:
    module = AttributeClassifier()
    return jax.jit(lambda params, images: jax.tree.map(
        functools.partial(jnp.argmax, axis=-1), module.apply({"params": params}, images)
    ))


def predict(params: Params, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted value index [N] per attribute for uint8 images [N, S, S, 3] (S = 32k)."""
    x = to_classifier_resolution(images)
    out: dict[str, list[np.ndarray]] = {name: [] for name in ATTRIBUTES}
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - len(chunk)  # one shape, one compilation
        padded = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        for name, values in _predict_fn()(params, padded).items():
            out[name].append(np.asarray(values)[: len(chunk)])
    return {name: np.concatenate(v) for name, v in out.items()}


def accuracy(predicted: dict[str, np.ndarray], scenes: Scenes) -> dict[str, float]:
    """Fraction of scenes whose predicted value equals the true one, per attribute."""
    return {
        name: float(np.mean(predicted[name] == truth)) for name, truth in scenes.labels().items()
    }


def evaluate(params: Params, n: int = 2000, seed: int = 12345, size: int = RESOLUTION):
    """Per-attribute accuracy on n fresh scenes of the whole world."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n)
    return accuracy(predict(params, render(scenes, size, rng)), scenes)


def save_params(path: str | Path, params: Params, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {
        "/".join(k): np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()
    }
    save_file(flat, str(path), metadata=metadata)
    return path


def load_params(path: str | Path) -> Params:
    from safetensors.numpy import load_file

    flat = {tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(str(path)).items()}
    return traverse_util.unflatten_dict(flat)

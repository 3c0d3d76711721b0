"""The class images of prior preservation (`core_jax/methods/prior.py`): generated once by the
frozen model from the class prompt ("a photo of a dog"), encoded into a latent pool as the
concept's photos are (the VAE, or the toy models' pixel space), and cached on disk.

A pool is keyed by everything that decides its contents: the model (`setup.model_identity`), the
class prompt, the count, the seed, the resolution and the sampler settings. It lives in a folder
(`<workdir>/class_pools`, a sweep's own workdir for all its runs, or the stage's
`class_pool_dir`) as `<key>.npz` (the latents' mean and std), `<key>.json` (what it was made
from) and `<key>.png` (the first images, to look at); a second run, a rerun, a resumed run and
every run of a sweep asking for the same key read it instead of generating. Files are written
to a temporary name and renamed, so a crash leaves no half pool; an unreadable one is made anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from core_jax.data import save_image_grid
from core_jax.files import atomic_write_bytes
from core_jax.sample import Pipeline, generate
from core_jax.text import fill_template

CHUNK = 8  # images per sampler call: one compiled program, the last chunk padded
PREVIEW = 16  # images in <key>.png

Pool = tuple[np.ndarray, np.ndarray]  # scaled latent mean, std [Q, h, w, c]


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What a pool is made from; `key` names its files."""

    model: str
    prompt: str
    count: int
    seed: int
    resolution: int
    sampler: str
    steps: int
    guidance_scale: float

    @property
    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def pool_spec(config: ml_collections.ConfigDict, stage: str, model: str) -> PoolSpec:
    """The pool a run's `stage` (one that lists prior_preservation) reads, for its concept."""
    s = config[stage]
    return PoolSpec(
        model=model,
        prompt=fill_template(s.class_prompt, config.concept.super_category),
        count=int(s.num_class_images),
        seed=int(s.class_seed),
        resolution=int(config.data.resolution),
        sampler=str(s.class_sampler),
        steps=int(s.class_steps),
        guidance_scale=float(s.class_guidance_scale),
    )


def generate_class_images(
    models: Any, spec: PoolSpec, progress: Callable[[str], None] | None = None
) -> np.ndarray:
    """spec.count images [Q, H, W, 3] uint8 of spec.prompt from the frozen model (`models`: a
    `core_jax.train.setup.Models`), CHUNK per compiled sampler call, each chunk's noise from
    (seed, chunk index)."""
    m = models
    pipeline = Pipeline(m.tokenizer, (), m.text_encoder, m.params["text"], m.unet,
                        m.params["unet"], m.vae, m.params["vae"], m.schedule)
    chunks = []
    for k, start in enumerate(range(0, spec.count, CHUNK)):
        seed = int(np.random.SeedSequence([spec.seed, k]).generate_state(1)[0])
        chunks.append(generate(
            pipeline, [spec.prompt], num_images_per_prompt=CHUNK, steps=spec.steps,
            sampler=spec.sampler, guidance_scale=spec.guidance_scale, seed=seed,
            height=spec.resolution, width=spec.resolution,
        ))
        if progress:
            done = min(start + CHUNK, spec.count)
            progress(f"class images for {spec.prompt!r}: {done}/{spec.count}")
    return np.concatenate(chunks)[: spec.count]


class ClassPools:
    """The class pools of a job: read from `folder` (or a stage's own folder) or generated and
    written there, and kept in memory for the job's other packs. `generated` counts the pools
    this job had to generate."""

    def __init__(self, folder: Path, progress: Callable[[str], None] | None = None):
        self.folder, self.progress = Path(folder), progress
        self.generated = 0
        self._memory: dict[str, Pool] = {}

    def get(self, spec: PoolSpec, models: Any, folder: str | Path = "") -> Pool:
        """The pool of `spec` (mean, std) [Q, h, w, c], generated if no readable one exists."""
        if spec.key in self._memory:
            return self._memory[spec.key]
        folder = Path(folder) if folder else self.folder
        path = folder / f"{spec.key}.npz"
        pool = _read(path, spec.count)
        if pool is None:
            pool = self._make(spec, models, folder)
        self._memory[spec.key] = pool
        return pool

    def _make(self, spec: PoolSpec, models: Any, folder: Path) -> Pool:
        from core_jax.train.setup import encode_latent_pool

        if self.progress:
            self.progress(f"generating {spec.count} class images for {spec.prompt!r} "
                          f"({spec.sampler}, {spec.steps} steps) into {folder}")
        images = generate_class_images(models, spec, self.progress)
        views = images.astype(np.float32) / 127.5 - 1.0  # as core_jax.data's views: [-1, 1]
        mean, std = encode_latent_pool(models.vae, models.params["vae"], views)
        self.generated += 1
        folder.mkdir(parents=True, exist_ok=True)
        save_image_grid(images[:PREVIEW], folder / f"{spec.key}.png")

        def npz() -> bytes:
            out = io.BytesIO()
            np.savez(out, mean=mean, std=std)
            return out.getvalue()

        atomic_write_bytes(folder / f"{spec.key}.json",
                           json.dumps(dataclasses.asdict(spec), indent=2).encode())
        atomic_write_bytes(folder / f"{spec.key}.npz", npz)  # last: the pool exists once it does
        return mean, std


def _read(path: Path, count: int) -> Pool | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            mean, std = f["mean"], f["std"]
    except (OSError, ValueError, KeyError):
        return None
    if mean.shape != std.shape or mean.shape[0] != count:
        return None
    return mean, std

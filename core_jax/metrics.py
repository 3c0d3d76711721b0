"""The field's real personalization metrics, from local weight folders: CLIP-T, CLIP-I, DINO.

- CLIP-T: cosine between a generated image's CLIP embedding and its prompt's (the prompt as a
  user would write it, the learned word replaced by the super-category: "a dog in the snow").
- CLIP-I: cosine between CLIP embeddings of generated images and the concept's photos, averaged
  over all pairs.
- DINO: the same with DINO (ViT) class-token embeddings; more sensitive to identity than CLIP-I.

This torch path is the reference the tests hold `core_jax.eval.scores` (our Flax models, what
`core-jax score` uses) against. The models are transformers' PyTorch ones (`CLIPModel`, and
`AutoModel` for DINO / DINOv2) read from folders the user has
(`openai/clip-vit-large-patch14`, `facebook/dino-vits16`, ...): nothing is downloaded, and
torch is needed only here. Images are uint8 [N, H, W, 3]; they are resized (bicubic, shorter
side), centre-cropped and normalised as the model's preprocessor_config.json says, or with the
model family's standard constants without one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core_jax.errors import InputError
from core_jax.eval.preprocess import (
    BICUBIC,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessing,
)


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise InputError(
            "CLIP/DINO metrics use transformers' PyTorch models: install torch (CPU wheel) first"
        ) from err
    return torch


def _model_folder(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{what} model folder {folder} has no config.json")
    return folder


def _normalisation(folder: Path, mean: Sequence[float], std: Sequence[float]) -> tuple:
    config_path = folder / "preprocessor_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        return tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return tuple(mean), tuple(std)


def preprocess(
    images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, size, size] for the torch models: CLIP's
    processing (`core_jax.eval.preprocess`) with the given constants, channels first."""
    processing = ImageProcessing(size, None, (size, size), BICUBIC, tuple(mean), tuple(std))
    return processing(np.asarray(images, np.uint8)).transpose(0, 3, 1, 2)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Images per forward pass: a few hundred generated images at once would hold all their
# activations (ViT-L/14: ~60 MB per image) in memory together.
BATCH_SIZE = 32


def _projected(features: Any) -> Any:
    """`get_image_features` / `get_text_features` give the projected tensor in transformers 4.x
    and an output object whose `pooler_output` holds it in 5.x."""
    return getattr(features, "pooler_output", features)


def _batched(fn: Any, items: Sequence[Any]) -> np.ndarray:
    """fn over `items` in slices of BATCH_SIZE; numpy results joined along the first axis."""
    return np.concatenate([fn(items[i : i + BATCH_SIZE]) for i in range(0, len(items), BATCH_SIZE)])


class ClipScorer:
    """CLIP image and text embeddings from a local `CLIPModel` folder (with its tokenizer)."""

    def __init__(self, folder: str | Path):
        torch = _torch()
        from transformers import CLIPModel, CLIPTokenizer

        folder = _model_folder(folder, "CLIP")
        self.torch = torch
        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = _normalisation(folder, CLIP_MEAN, CLIP_STD)

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        def embed(chunk: np.ndarray) -> np.ndarray:
            pixels = self.torch.from_numpy(preprocess(chunk, self.size, self.mean, self.std))
            with self.torch.no_grad():
                return _projected(self.model.get_image_features(pixel_values=pixels)).numpy()

        return _unit(_batched(embed, np.asarray(images)))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        def embed(chunk: Sequence[str]) -> np.ndarray:
            tokens = self.tokenizer(list(chunk), padding=True, truncation=True, return_tensors="pt")
            with self.torch.no_grad():
                return _projected(self.model.get_text_features(**tokens)).numpy()

        return _unit(_batched(embed, list(texts)))


class DinoScorer:
    """Class-token embeddings of a local DINO / DINOv2 ViT folder (`AutoModel`)."""

    def __init__(self, folder: str | Path):
        torch = _torch()
        from transformers import AutoModel

        folder = _model_folder(folder, "DINO")
        self.torch = torch
        self.model = AutoModel.from_pretrained(folder).eval()
        self.size = self.model.config.image_size
        self.mean, self.std = _normalisation(folder, IMAGENET_MEAN, IMAGENET_STD)

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        def embed(chunk: np.ndarray) -> np.ndarray:
            pixels = self.torch.from_numpy(preprocess(chunk, self.size, self.mean, self.std))
            with self.torch.no_grad():
                hidden = self.model(pixel_values=pixels).last_hidden_state  # [N, 1 + patches, D]
            return hidden[:, 0].numpy()

        return _unit(_batched(embed, np.asarray(images)))


def clip_t(scorer: ClipScorer, images: np.ndarray, prompts: Sequence[str]) -> float:
    """Mean cosine of each image [N] with its prompt [N]."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return float(np.mean(np.sum(scorer.image_embeddings(images)
                                * scorer.text_embeddings(prompts), axis=-1)))


def image_similarity(
    scorer: ClipScorer | DinoScorer, images: np.ndarray, references: np.ndarray
) -> float:
    """Mean cosine over all (generated, reference photo) pairs: CLIP-I or DINO."""
    return float(np.mean(scorer.image_embeddings(images) @ scorer.image_embeddings(references).T))

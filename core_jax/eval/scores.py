"""CLIP-T, CLIP-I and DINO with our Flax CLIP and DINO models, from local model folders.

- CLIP-T: cosine of a generated image's CLIP embedding with its prompt's, the learned word
  replaced by the class word ("a S* dog in the snow" -> "a dog in the snow").
- CLIP-I: mean cosine of a generated image's CLIP embedding with each real photo's.
- DINO: the same with the DINO / DINOv2 class token.

Embeddings come out of one jitted function per model and input shape: images go through in
batches of a fixed size, the last one zero-padded, so a folder of any size compiles once. The
models' weights are arguments of the jitted functions, not constants folded into them. Scores
are plain numpy functions of unit-norm embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from core_jax import weights
from core_jax.errors import InputError
from core_jax.eval import preprocess
from core_jax.text.tokenizer import load_tokenizer, tokenize

# Images per forward pass: ViT-L/14 holds ~60 MB of activations per image, so a few hundred at
# once would not fit; 32 keeps an accelerator busy and a CPU run in a few GB.
BATCH_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImageSource = np.ndarray | str | Path


def _jit_exact(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """jax.jit of fn with fp32 matrix products at full precision on every backend: TPUs
    default to one bf16 pass and GPUs may use TF32, which move cosines by ~1e-3, as much as
    the differences between the methods being compared."""

    def exact(*args: Any) -> jax.Array:
        with jax.default_matmul_precision("highest"):
            return fn(*args)

    return jax.jit(exact)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] (grey, palette and alpha images converted as transformers does)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from err


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def in_batches(
    fn: Callable[[Any, np.ndarray], jax.Array], params: Any, rows: np.ndarray, batch_size: int
) -> np.ndarray:
    """fn(params, rows[i:i + batch_size]) over all rows, the last slice zero-padded to
    batch_size (padded outputs dropped): one input shape, one compile."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(params, chunk))[: batch_size - pad])
    return np.concatenate(out)


class _ImageEmbedder:
    """Preprocessing + a jitted image model, in fixed-size batches; loads files per batch."""

    def __init__(self, processing: preprocess.ImageProcessing, image_size: int | None,
                 fn: Callable[[Any, jax.Array], jax.Array], params: Any, batch_size: int,
                 folder: Path):
        probe = processing([np.zeros((64, 48, 3), np.uint8)])
        if image_size is not None and probe.shape[1:3] != (image_size, image_size):
            raise InputError(
                f"{folder}: the preprocessor gives {probe.shape[2]}x{probe.shape[1]} images, "
                f"the model takes {image_size}x{image_size}"
            )
        self.processing, self.params, self.batch_size = processing, params, batch_size
        self._fn = _jit_exact(fn)

    def __call__(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Unit-norm embeddings [N, D] of uint8 arrays or image files."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [read_image(i) if isinstance(i, (str, Path)) else i
                     for i in images[start : start + self.batch_size]]
            out.append(in_batches(self._fn, self.params, self.processing(chunk), self.batch_size))
        return np.concatenate(out)


class ClipEmbedder:
    """CLIP image and text embeddings (projected, unit norm) of a transformers `CLIPModel`
    folder with its tokenizer."""

    def __init__(self, folder: str | Path, batch_size: int = BATCH_SIZE,
                 allow_pickle: bool = False):
        folder = Path(folder)
        vision, vision_params, text, text_params = weights.load_clip(
            folder, allow_pickle=allow_pickle)
        self.tokenizer = load_tokenizer(folder)
        self.max_length = text.config.max_position_embeddings
        self.batch_size = batch_size
        size = vision.config.image_size
        self.images = _ImageEmbedder(
            preprocess.from_folder(folder, "clip", size), size,
            lambda p, x: _unit(vision.apply({"params": p}, x).image_embeds),
            vision_params, batch_size, folder,
        )
        self._text = _jit_exact(lambda p, ids: _unit(text.apply({"params": p}, ids)[1]))
        self._text_params = text_params

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings [N, P]; ids padded to the model's full length (one
        shape), pooled at the first end-of-text as CLIP does."""
        ids = tokenize(self.tokenizer, list(texts), self.max_length)
        return in_batches(self._text, self._text_params, ids, self.batch_size)


class DinoEmbedder:
    """Class-token embeddings (unit norm) of a DINO (ViT) or DINOv2 folder."""

    def __init__(self, folder: str | Path, batch_size: int = BATCH_SIZE,
                 allow_pickle: bool = False):
        folder = Path(folder)
        module, params = weights.load_dino(folder, allow_pickle=allow_pickle)
        family = module.config.model_type
        # DINOv2 takes any multiple of its patch size (positions are interpolated); ViT only
        # its own image size.
        size = None if family == "dinov2" else module.config.image_size
        self.images = _ImageEmbedder(
            preprocess.from_folder(folder, family, module.config.image_size), size,
            lambda p, x: _unit(module.apply({"params": p}, x)[:, 0]),
            params, batch_size, folder,
        )


def clip_t(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-image cosine [N] of unit embeddings [N, D] with their prompts' [N, D]."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"{len(image_embeds)} images for {len(text_embeds)} prompts")
    return np.sum(image_embeds.astype(np.float64) * text_embeds, axis=-1)


def mean_similarity(embeds: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image mean cosine [N] with every reference [M, D] (CLIP-I, DINO); its mean is the
    mean over all N x M pairs."""
    return (embeds.astype(np.float64) @ references.astype(np.float64).T).mean(axis=1)


def clip_t_text(prompt: str, placeholder: str, class_word: str) -> str:
    """The prompt CLIP-T compares with: the placeholder replaced by the class word, or dropped
    where the class word already follows it ("a S* dog" -> "a dog", "a photo of S*" -> "a
    photo of dog"); whitespace collapsed."""
    follows = rf"(\s+{re.escape(class_word)}\b)?" if class_word else ""
    text = re.sub(re.escape(placeholder) + follows, lambda _: class_word, prompt)
    return " ".join(text.split())

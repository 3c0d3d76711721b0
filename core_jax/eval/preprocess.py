"""Image preprocessing equal to transformers' image processors, in numpy and PIL.

- CLIP (`CLIPImageProcessor`): shorter side to 224 (bicubic), centre crop 224, CLIP mean/std.
- DINO v1 (`ViTImageProcessor`, facebook/dino-vits16): resize to 224 x 224 (bilinear, aspect
  not kept), no crop, ImageNet mean/std.
- DINOv2 (`BitImageProcessor`): shorter side to 256 (bicubic), centre crop 224, ImageNet.

A model folder's `preprocessor_config.json` says which, field for field; without one, the
family's standard settings above (at the model's own image size) are used. Resizing goes
through PIL on the uint8 image, as transformers does, so the pixels are the same integers
before scaling. Output: float32 [N, H, W, 3], channels last for the Flax models.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core_jax.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC, BILINEAR = int(Image.BICUBIC), int(Image.BILINEAR)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """One processor's settings. `shortest_edge` set: the shorter side goes to it, the longer
    to `int(shortest_edge * long / short)`; otherwise the image goes to `resize_to` (h, w)."""

    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop: tuple[int, int] | None  # (h, w) centre crop after the resize
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images [H, W, 3] (any sizes) -> float32 [N, h, w, 3]."""
        return np.stack([self._one(np.asarray(image, np.uint8)) for image in images])

    def _one(self, image: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(image)
        if self.shortest_edge is not None:
            short, long = sorted((pil.width, pil.height))
            scaled = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, scaled) if pil.width <= pil.height else (
                scaled, self.shortest_edge)
            pil = pil.resize(size, self.resample)
        elif self.resize_to is not None:
            pil = pil.resize(self.resize_to[::-1], self.resample)
        pixels = np.asarray(pil)
        if self.crop is not None:
            height, width = self.crop
            if pixels.shape[0] < height or pixels.shape[1] < width:
                raise InputError(f"a {pixels.shape[1]}x{pixels.shape[0]} image is smaller than "
                                 f"the {width}x{height} crop after resizing")
            top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
            pixels = pixels[top : top + height, left : left + width]
        # transformers scales in float64 and normalises in float32.
        scaled = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        return (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def family_default(family: str, image_size: int) -> ImageProcessing:
    """The standard processor of a model family ("clip", "vit" for DINO v1, "dinov2")."""
    if family == "clip":
        return ImageProcessing(image_size, None, (image_size, image_size), BICUBIC,
                               CLIP_MEAN, CLIP_STD)
    if family == "vit":
        return ImageProcessing(None, (image_size, image_size), None, BILINEAR,
                               IMAGENET_MEAN, IMAGENET_STD)
    if family == "dinov2":  # 256 -> 224 whatever the checkpoint's stored size (518)
        return ImageProcessing(256, None, (224, 224), BICUBIC, IMAGENET_MEAN, IMAGENET_STD)
    raise ValueError(f"unknown model family {family!r}")


def _size(value: Any, square: bool) -> tuple[int | None, tuple[int, int] | None]:
    """transformers' size forms -> (shortest_edge, (h, w)); a bare int is a square for ViT's
    processor and a shortest edge for CLIP's and Bit's (their `default_to_square`)."""
    if isinstance(value, int):
        return (None, (value, value)) if square else (value, None)
    if "shortest_edge" in value:
        return int(value["shortest_edge"]), None
    return None, (int(value["height"]), int(value["width"]))


def from_folder(folder: str | Path, family: str, image_size: int) -> ImageProcessing:
    """A model folder's `preprocessor_config.json`, or the family default without one."""
    path = Path(folder) / "preprocessor_config.json"
    default = family_default(family, image_size)
    if not path.is_file():
        return default
    try:
        config = json.loads(path.read_text())
        shortest, resize_to = default.shortest_edge, default.resize_to
        if config.get("do_resize", True) and "size" in config:
            shortest, resize_to = _size(config["size"], square=family == "vit")
        elif not config.get("do_resize", True):
            shortest = resize_to = None
        crop = default.crop
        if not config.get("do_center_crop", default.crop is not None):
            crop = None
        elif "crop_size" in config:
            crop = _size(config["crop_size"], square=True)[1]
        normalize = config.get("do_normalize", True)
        return ImageProcessing(
            shortest_edge=shortest, resize_to=resize_to, crop=crop,
            resample=int(config.get("resample", default.resample)),
            mean=tuple(config.get("image_mean", default.mean)) if normalize else (0.0,) * 3,
            std=tuple(config.get("image_std", default.std)) if normalize else (1.0,) * 3,
            rescale=float(config.get("rescale_factor", default.rescale))
            if config.get("do_rescale", True) else 1.0,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a preprocessor config transformers writes ({err})") from err

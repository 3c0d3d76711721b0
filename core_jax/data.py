"""Concept images: loading, the shipped examples, CoRe's, Custom Diffusion's and TextBoost's
augmentations, and image grids.

Pure numpy + PIL. Every random choice comes from a `np.random.Generator`, so a seed fixes the
output bit for bit.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from core_jax.errors import InputError
from core_jax.files import atomic_write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)

# CoRe stage 1 augmentation (DESIGN.md, "CoRe, exactly").
ROTATE_P = 0.75
MAX_ANGLE = 45.0
FLIP_P = 0.25


# --------------------------------------------------------------------------------------------
# Loading


def _warn(message: str) -> None:
    # stacklevel 3: attribute the warning to whoever called the public function.
    warnings.warn(message, stacklevel=3)


def _decode(path: Path, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Open, decode and upright one file, downscaled to at most `max_pixels` pixels.

    Returns the image and the file's own (width, height).
    """
    with warnings.catch_warnings():
        # We bound the size ourselves below; PIL still raises DecompressionBombError for files
        # over twice its own limit, which the caller turns into a skip.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                # JPEG can decode at 1/2, 1/4, 1/8 scale, sparing the memory of the full frame.
                scale = math.sqrt(max_pixels / (w * h))
                img.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
            # Loads the pixels, so truncated files fail here.
            out = ImageOps.exif_transpose(img)
    if out.width * out.height > max_pixels:
        scale = math.sqrt(max_pixels / (out.width * out.height))
        size = (max(1, int(out.width * scale)), max(1, int(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS)
    return out, (w, h)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → uint8 [H, W, 3]; transparency composited onto white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit samples: a plain convert("L") would clip at 255 instead of rescaling.
        arr = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        gray = np.round(arr / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def load_concept_images(
    folder: str | os.PathLike,
    *,
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> list[np.ndarray]:
    """Load every image in `folder` as uint8 RGB [H, W, 3], sorted by file name.

    Accepts .jpg/.jpeg/.png/.webp/.bmp in any case. EXIF orientation is applied, transparency is
    composited onto white, grayscale and 16-bit images become 8-bit RGB. Files that cannot be read
    are skipped with a warning; images whose shorter side is below `min_size` are kept with a
    warning (they will be upscaled); images above `max_pixels` are downscaled with a warning.

    Raises:
        InputError: the folder is missing, or holds no readable image.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise InputError(f"Concept folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise InputError(f"Concept folder {str(root)!r} is not a directory.")

    # Hidden files (.DS_Store, editor swap files) and sub-folders are never user images.
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images: list[np.ndarray] = []
    skipped: list[str] = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(path.name)
            _warn(f"Skipping {path}: not a supported image type ({', '.join(IMAGE_SUFFIXES)}).")
            continue
        try:
            img, (orig_w, orig_h) = _decode(path, max_pixels)
        # PIL signals malformed files with many exception types (OSError, SyntaxError,
        # DecompressionBombError, struct.error, ...); any of them means: skip this file.
        except Exception as err:
            skipped.append(path.name)
            _warn(f"Skipping {path}: cannot read it as an image ({str(err).rstrip('.')}).")
            continue
        rgb = _to_rgb(img)
        h, w = rgb.shape[:2]
        if orig_w * orig_h > max_pixels:
            _warn(
                f"{path} is {orig_w}x{orig_h} pixels; downscaled to {w}x{h} "
                f"(limit {max_pixels} pixels)."
            )
        if min_size is not None and min(h, w) < min_size:
            _warn(f"{path} is only {w}x{h} pixels, below {min_size}; it will be upscaled.")
        images.append(rgb)

    if not images:
        if not files:
            raise InputError(f"Concept folder {str(root)!r} is empty.")
        raise InputError(
            f"No readable image in {str(root)!r} (skipped: {', '.join(skipped)}); "
            f"supported types are {', '.join(IMAGE_SUFFIXES)}."
        )
    return images


# --------------------------------------------------------------------------------------------
# Shipped example concepts


class BuiltinConcept(NamedTuple):
    supercategory: str
    animate: bool  # picks the CoRe template set ("animate" for pets and people)
    # Fractional (left, top, right, bottom) boxes: each one is a "photo" of the concept.
    views: tuple[tuple[float, float, float, float], ...]


BUILTIN_CONCEPTS: dict[str, BuiltinConcept] = {
    # skimage.data.chelsea(): a tabby cat's face, 451x300.
    "chelsea": BuiltinConcept(
        "cat",
        True,
        (
            (0.0, 0.0, 1.0, 1.0),
            (0.04, 0.0, 0.71, 1.0),
            (0.24, 0.13, 0.82, 0.97),
            (0.22, 0.0, 1.0, 1.0),
        ),
    ),
    # skimage.data.coffee(): an espresso cup on a saucer, 600x400.
    "coffee": BuiltinConcept(
        "cup",
        False,
        (
            (0.0, 0.0, 1.0, 1.0),
            (0.17, 0.0, 0.83, 1.0),
            (0.25, 0.0, 0.75, 0.8),
            (0.08, 0.05, 0.85, 1.0),
        ),
    ),
    # skimage.data.astronaut(): a NASA astronaut portrait, 512x512.
    "astronaut": BuiltinConcept(
        "person",
        True,
        (
            (0.0, 0.0, 1.0, 1.0),
            (0.1, 0.0, 0.75, 0.65),
            (0.25, 0.0, 0.62, 0.4),
            (0.0, 0.1, 0.8, 1.0),
        ),
    ),
}


def builtin_concept(name: str = "chelsea") -> list[np.ndarray]:
    """Four uint8 RGB "photos" of a concept shipped with scikit-image; no download needed.

    Each is a fixed crop (full frame, square, close-up, off-centre) of one real photograph:
    "chelsea" (a cat), "coffee" (a cup, inanimate) or "astronaut" (a person). The super-category
    word and animate flag are in `BUILTIN_CONCEPTS[name]`.
    """
    if name not in BUILTIN_CONCEPTS:
        raise InputError(
            f"Unknown built-in concept {name!r}; choose one of {', '.join(BUILTIN_CONCEPTS)}."
        )
    # Imported here: skimage is slow to import and only the default run needs it.
    import skimage.data

    photo = np.asarray(getattr(skimage.data, name)())[..., :3]
    h, w = photo.shape[:2]
    return [
        np.ascontiguousarray(photo[round(t * h) : round(b * h), round(l * w) : round(r * w)])
        for l, t, r, b in BUILTIN_CONCEPTS[name].views
    ]


# --------------------------------------------------------------------------------------------
# Augmentation


class AugmentParams(NamedTuple):
    """One draw of the augmentation; independent of the image so it can be sampled first."""

    angle: float  # degrees, counter-clockwise; 0.0 means no rotation
    flip: bool
    crop_x: float  # fractions in [0, 1) of the free room left by the crop
    crop_y: float


def sample_augment_params(
    rng: np.random.Generator,
    *,
    rotate_p: float = ROTATE_P,
    max_angle: float = MAX_ANGLE,
    flip_p: float = FLIP_P,
) -> AugmentParams:
    """Draw one augmentation. Always consumes five numbers, so streams stay aligned."""
    rotate, angle, flip, crop_x, crop_y = rng.random(5)
    return AugmentParams(
        angle=float((2.0 * angle - 1.0) * max_angle) if rotate < rotate_p else 0.0,
        flip=bool(flip < flip_p),
        crop_x=float(crop_x),
        crop_y=float(crop_y),
    )


def apply_augment(image: Image.Image, params: AugmentParams, resolution: int) -> np.ndarray:
    """Rotate (expanding the canvas), resize the shorter side to `resolution`, flip, crop.

    Returns float32 [resolution, resolution, 3] in [-1, 1].
    """
    return _augment_and_crop(image, params, resolution)[0]


def _augment_and_crop(
    image: Image.Image, params: AugmentParams, resolution: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """`apply_augment`'s view and the crop's (top, left) in the resized (rotated, flipped)
    image it was cut from."""
    img = image.convert("RGB")
    if params.angle != 0.0:
        # Expanded corners are filled with white, like transparent pixels on load: a flat,
        # featureless background is what the model can learn to ignore, whereas edge
        # replication paints streaks that look like content and black reads as a dark frame.
        img = img.rotate(
            params.angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=WHITE
        )
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    left = int(params.crop_x * (img.width - resolution + 1))
    top = int(params.crop_y * (img.height - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0, (top, left)


def augment(
    image: np.ndarray | Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    rotate_p: float = ROTATE_P,
    max_angle: float = MAX_ANGLE,
    flip_p: float = FLIP_P,
) -> np.ndarray:
    """One CoRe-augmented view of `image`: float32 [resolution, resolution, 3] in [-1, 1]."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    params = sample_augment_params(rng, rotate_p=rotate_p, max_angle=max_angle, flip_p=flip_p)
    return apply_augment(img, params, resolution)


def augmented_views(
    images: Sequence[np.ndarray],
    num_views: int,
    resolution: int,
    seed: int,
    *,
    rotate_p: float = ROTATE_P,
    max_angle: float = MAX_ANGLE,
    flip_p: float = FLIP_P,
) -> np.ndarray:
    """`num_views` augmented views, cycling through `images` in order.

    Returns float32 [num_views, resolution, resolution, 3] in [-1, 1] (NHWC). The same seed
    gives bitwise the same array. `augmented_views_with_time_ids` also says where each came from.
    """
    return augmented_views_with_time_ids(
        images, num_views, resolution, seed, rotate_p=rotate_p, max_angle=max_angle,
        flip_p=flip_p,
    )[0]


def augmented_views_with_time_ids(
    images: Sequence[np.ndarray],
    num_views: int,
    resolution: int,
    seed: int,
    *,
    rotate_p: float = ROTATE_P,
    max_angle: float = MAX_ANGLE,
    flip_p: float = FLIP_P,
) -> tuple[np.ndarray, np.ndarray]:
    """`augmented_views` and each view's SDXL add-time ids, int32 [num_views, 6]: the photo's
    (height, width) as given, the crop's (top, left) in the photo rotated, resized (shorter
    side `resolution`) and flipped, and the view's (height, width), as diffusers'
    train_text_to_image_sdxl.py records them (it flips before it crops, as we do)."""
    if not images:
        raise InputError("No concept images to augment.")
    if num_views < 1 or resolution < 1:
        raise ValueError(
            f"num_views and resolution must be positive, got {num_views}, {resolution}."
        )
    pils = []
    for image in images:
        img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        # Rotation commutes with isotropic scaling, so shrinking large photos first changes only
        # resampling, not which content lands in the crop; 2x headroom keeps the final resize a
        # downsample and saves rotating tens of megapixels per view.
        if min(img.size) > 2 * resolution:
            scale = 2 * resolution / min(img.size)
            size = (round(img.width * scale), round(img.height * scale))
            img = img.resize(size, Image.Resampling.LANCZOS)
        pils.append(img)
    rng = np.random.default_rng(seed)
    out = np.empty((num_views, resolution, resolution, 3), dtype=np.float32)
    time_ids = np.empty((num_views, 6), dtype=np.int32)
    for i in range(num_views):
        params = sample_augment_params(rng, rotate_p=rotate_p, max_angle=max_angle, flip_p=flip_p)
        out[i], crop = _augment_and_crop(pils[i % len(pils)], params, resolution)
        time_ids[i] = (*np.shape(images[i % len(images)])[:2], *crop, resolution, resolution)
    return out, time_ids


# Custom Diffusion's augmentation (diffusers' examples/custom_diffusion/train_custom_diffusion.py,
# CustomDiffusionDataset, as the ClassDiffusion code: METHODS.md section 2 and 5).
ZOOM_OUT_P = 0.66  # the share of views shrunk onto a canvas; the rest are zoomed in
ZOOM_IN_RANGE = (1.2, 1.4)  # zoomed-in side, as a multiple of the resolution
CD_FLIP_P = 0.5  # its --hflip


def zoom_view(
    image: Image.Image, resolution: int, factor: int, rng: np.random.Generator,
    flip_p: float = CD_FLIP_P,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One view as Custom Diffusion's code makes it, its object region at latent resolution,
    and the crop's (top, left) for SDXL's add-time ids.

    The photo is flipped (p = `flip_p`), resized to a square of a random side s (the code
    squashes, it does not crop to a square first): with p 0.66 s in [R/3, R] and the photo is
    placed at a random position on a blank canvas of side R (0 in [-1, 1], mid grey); otherwise
    s in [1.2 R, 1.4 R) and a random R x R crop of it is the view. The mask [R/f, R/f, 1]
    (f = the VAE's factor) is all ones for a crop; for a canvas it marks the latent pixels the
    photo covers, less one pixel on each side, as the code's
    `mask[top // f + 1 : (top + s) // f - 1, left // f + 1 : (left + s) // f - 1] = 1`.
    The crop's (top, left) is where the view was cut from the resized photo; (0, 0) for a
    canvas, which cuts nothing off (SDXL was never trained on negative crops).

    Returns (float32 [R, R, 3] in [-1, 1], bool [R/f, R/f, 1], (top, left)).
    """
    img = image.convert("RGB")
    if rng.random() < flip_p:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < ZOOM_OUT_P:
        side = int(rng.integers(resolution // 3, resolution + 1))
    else:
        low, high = (int(k * resolution) for k in ZOOM_IN_RANGE)
        side = int(rng.integers(low, high))
    outer, inner = max(side, resolution), min(side, resolution)
    top, left = (int(v) for v in rng.integers(0, outer - inner + 1, size=2))
    pixels = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.float32)
    pixels = pixels / 127.5 - 1.0
    cells = resolution // factor
    if side > resolution:
        view = pixels[top : top + resolution, left : left + resolution]
        return np.ascontiguousarray(view), np.ones((cells, cells, 1), bool), (top, left)
    view = np.zeros((resolution, resolution, 3), np.float32)
    view[top : top + side, left : left + side] = pixels
    mask = np.zeros((cells, cells, 1), bool)
    mask[top // factor + 1 : (top + side) // factor - 1,
         left // factor + 1 : (left + side) // factor - 1] = True
    return view, mask, (0, 0)


def zoom_views(
    images: Sequence[np.ndarray], num_views: int, resolution: int, factor: int, seed: int,
    flip_p: float = CD_FLIP_P,
) -> tuple[np.ndarray, np.ndarray]:
    """`num_views` views by `zoom_view`, cycling through `images` in order: float32
    [N, R, R, 3] in [-1, 1] and their object masks bool [N, R/f, R/f, 1]. The same seed gives
    bitwise the same arrays. `zoom_views_with_time_ids` also says where each came from."""
    return zoom_views_with_time_ids(images, num_views, resolution, factor, seed, flip_p)[:2]


def zoom_views_with_time_ids(
    images: Sequence[np.ndarray], num_views: int, resolution: int, factor: int, seed: int,
    flip_p: float = CD_FLIP_P,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`zoom_views` and each view's SDXL add-time ids int32 [N, 6]: the photo's (height,
    width), the crop's (top, left) (`zoom_view`), the view's (height, width)."""
    if not images:
        raise InputError("No concept images to augment.")
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}")
    rng = np.random.default_rng(seed)
    pils = [Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB") for image in images]
    views, masks, time_ids = [], [], []
    for i in range(num_views):
        view, mask, crop = zoom_view(pils[i % len(pils)], resolution, factor, rng, flip_p)
        views.append(view)
        masks.append(mask)
        time_ids.append((*np.shape(images[i % len(images)])[:2], *crop, resolution, resolution))
    return np.stack(views), np.stack(masks), np.asarray(time_ids, np.int32)


# TextBoost's paired augmentation (object mode; the code's `paired_augmentation.py`, METHODS.md
# section 3): three groups, each applied with probability p, and each applied transform's token
# goes into that view's caption. Within the geometric group one transform is drawn uniformly.
TEXTBOOST_AUGMENT_P = 0.5  # run_textboost_db.py's --augment_p
SCALE_RANGE = (0.34, 1.4)  # adjust_scale's factor
ZOOM_OUT_BELOW, ZOOM_IN_ABOVE = 0.6, 1.2  # the factors that name the zoom
TRANSLATE_RANGE = (0.15, 0.30)  # horizontal_translate's shift, a share of the width
CROP_AREA = (0.08, 1.0)  # RandomResizedCrop's defaults (torchvision) [UNVERIFIED: the code's]
CROP_RATIO = (3 / 4, 4 / 3)
GEOMETRIC = ("scale", "crop", "translate", "hflip")


class PairedView(NamedTuple):
    """One view of TextBoost's paired augmentation and the augmentation tokens its caption
    takes, in the order applied ("<hflip>", "<grayscale>", ...)."""

    pixels: np.ndarray  # float32 [R, R, 3] in [-1, 1]
    tokens: tuple[str, ...]


def _square(img: Image.Image, resolution: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((resolution, resolution),
                                                Image.Resampling.BILINEAR), np.float32)


def _scaled(img: Image.Image, factor: float, resolution: int) -> np.ndarray:
    """The photo at `factor` times the view's side, centred: on a mid-grey canvas when smaller,
    its centre cut out when larger. [UNVERIFIED: the code's placement]"""
    side = max(1, round(factor * resolution))
    pixels = _square(img, side)
    canvas = np.full((resolution, resolution, 3), 127.5, np.float32)
    if side <= resolution:
        top = (resolution - side) // 2
        canvas[top:top + side, top:top + side] = pixels
        return canvas
    top = (side - resolution) // 2
    return pixels[top:top + resolution, top:top + resolution]


def _random_resized_crop(img: Image.Image, resolution: int, rng: np.random.Generator
                         ) -> np.ndarray:
    """torchvision's RandomResizedCrop: a box of a random share of the area and aspect ratio,
    resized to the view (the whole photo when no box fits in 10 draws)."""
    width, height = img.size
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return _square(img.crop((left, top, left + w, top + h)), resolution)
    return _square(img, resolution)


def _translated(pixels: np.ndarray, shift: int) -> np.ndarray:
    """The view moved `shift` pixels right (negative: left), the uncovered strip mid grey."""
    out = np.full_like(pixels, 127.5)
    if shift >= 0:
        out[:, shift:] = pixels[:, :pixels.shape[1] - shift]
    else:
        out[:, :shift] = pixels[:, -shift:]
    return out


def _collage(pixels: np.ndarray, cells: int) -> np.ndarray:
    """A square collage: the view shrunk `cells` x `cells` times and tiled."""
    resolution = pixels.shape[0]
    side = resolution // cells
    tile = _square(Image.fromarray(pixels.round().astype(np.uint8)), side)
    out = np.full_like(pixels, 127.5)
    for row in range(cells):
        for col in range(cells):
            out[row * side:(row + 1) * side, col * side:(col + 1) * side] = tile
    return out


def paired_view(
    image: Image.Image, resolution: int, rng: np.random.Generator,
    p: float = TEXTBOOST_AUGMENT_P,
) -> PairedView:
    """One view of TextBoost's paired augmentation (object mode) and its tokens:
    - geometric, with probability p, one of: scale by s ~ U(0.34, 1.4) ("<zoom-out>" below 0.6,
      "<zoom-in>" above 1.2, no token between), a random resized crop ("<crop>"), a horizontal
      shift of 15-30 % of the width ("<right>" / "<left>" by its direction), a horizontal flip
      ("<hflip>");
    - colour, with probability p: grayscale ("<grayscale>");
    - other, with probability p: a 2 x 2 or 3 x 3 collage of the view ("<collage>").
    Every draw is made whether or not used, so a seed's views stay aligned."""
    img = image.convert("RGB")
    use_geometric, use_colour, use_other = rng.random(3) < p
    transform = GEOMETRIC[int(rng.integers(len(GEOMETRIC)))]
    factor = rng.uniform(*SCALE_RANGE)
    shift = rng.uniform(*TRANSLATE_RANGE) * (1 if rng.random() < 0.5 else -1)
    cells = int(rng.integers(2, 4))
    crop_rng = np.random.default_rng(int(rng.integers(2**63)))  # its draws vary in number
    tokens: list[str] = []
    pixels = _square(img, resolution)
    if use_geometric:
        if transform == "scale":
            pixels = _scaled(img, factor, resolution)
            if factor < ZOOM_OUT_BELOW:
                tokens.append("<zoom-out>")
            elif factor > ZOOM_IN_ABOVE:
                tokens.append("<zoom-in>")
        elif transform == "crop":
            pixels = _random_resized_crop(img, resolution, crop_rng)
            tokens.append("<crop>")
        elif transform == "translate":
            pixels = _translated(pixels, round(shift * resolution))
            tokens.append("<right>" if shift > 0 else "<left>")
        else:
            pixels = pixels[:, ::-1]
            tokens.append("<hflip>")
    if use_colour:
        gray = pixels @ np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"
        pixels = np.repeat(gray[..., None], 3, axis=-1)
        tokens.append("<grayscale>")
    if use_other:
        pixels = _collage(pixels, cells)
        tokens.append("<collage>")
    return PairedView(np.ascontiguousarray(pixels / 127.5 - 1.0, np.float32), tuple(tokens))


def paired_views(
    images: Sequence[np.ndarray], num_views: int, resolution: int, seed: int,
    p: float = TEXTBOOST_AUGMENT_P,
) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """`num_views` views by `paired_view`, cycling through `images` in order: float32
    [N, R, R, 3] in [-1, 1] and each view's tokens. The same seed gives the same views."""
    if not images:
        raise InputError("No concept images to augment.")
    rng = np.random.default_rng(seed)
    pils = [Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB") for image in images]
    views = [paired_view(pils[i % len(pils)], resolution, rng, p) for i in range(num_views)]
    return np.stack([v.pixels for v in views]), [v.tokens for v in views]


# --------------------------------------------------------------------------------------------
# Output


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images pass through; float images in [-1, 1] map to [0, 255] (clipped, rounded)."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return np.round((np.clip(arr.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    pad: int = 2,
) -> Path:
    """Save [N, H, W, 3] images (float in [-1, 1] or uint8) as one PNG grid; returns the path.

    `nrow` images per row (default: a near-square grid), `pad` white pixels between them. The file
    is written to a temporary name in the same folder and then renamed, so readers never see a
    half-written PNG.
    """
    arr = to_uint8(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"Expected images of shape [N, H, W, 3], got {arr.shape}.")
    n, h, w, _ = arr.shape
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = arr[i]

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    def png() -> bytes:
        out = io.BytesIO()
        Image.fromarray(grid).save(out, format="PNG")
        return out.getvalue()

    atomic_write_bytes(target, png)
    return target


def concept_images(source: str, resolution: int, seed: int) -> list[np.ndarray]:
    """The photos `concept.images` names: a folder, "builtin:<name>" (scikit-image's photos) or
    "toyworld:<colour> <pattern> <shape>" (rendered by the toy world at `resolution`, seeded)."""
    if not source:
        raise InputError("no concept images: set --config.concept.images to a folder of photos")
    if source.startswith("builtin:"):
        return builtin_concept(source.removeprefix("builtin:"))
    if source.startswith("toyworld:"):
        from core_jax.toyworld import world  # a data source like a folder; numpy only

        try:
            identity = world.identity_from_words(source.removeprefix("toyworld:"))
        except ValueError as err:
            raise InputError(f"concept.images: {err}") from err
        return world.concept_images(identity, size=resolution, seed=seed)
    return load_concept_images(source, min_size=resolution)

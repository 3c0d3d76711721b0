"""A procedural world of one object per image, with plain English captions.

Each scene is seven attribute indices (shape, colour, pattern, size, position, background,
style); `render` draws a batch of scenes at any square size, vectorised over the batch, with every
random detail (jitter, clouds, snowflakes, sketch grain) drawn from the caller's generator, so
the same seed gives the same pixels. Shapes are signed-distance functions in the object's unit
frame, which gives anti-aliased edges, outlines and sketchy edges from one number per pixel.

The words were picked so that each one is a single token of the real CLIP vocabulary, and no
word belongs to two attributes: a caption parses back to its attributes word by word.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "moon")
COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")
PATTERNS = ("solid", "striped", "dotted", "checked")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
BACKGROUNDS = ("white", "black", "grass", "sky", "snow", "night", "beach", "brick")
STYLES = ("flat", "outline", "sketch", "framed")

# Attribute name -> its values, in the order scenes store them.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "style": STYLES,
}
# What a personalized concept is (its identity) and what a prompt may ask of its context.
IDENTITY_ATTRIBUTES = ("shape", "colour", "pattern")
CONTEXT_ATTRIBUTES = ("background", "style")

_RGB = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (1.00, 0.88, 0.05),
    "green": (0.15, 0.75, 0.15),
    "teal": (0.00, 0.55, 0.55),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.50, 0.75),
}
_COLOUR_TABLE = np.array([_RGB[c] for c in COLOURS], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

_POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_BACKGROUND_PHRASES = {
    "white": "on a white background",
    "black": "on a black background",
    "grass": "on grass",
    "sky": "in the sky",
    "snow": "in the snow",
    "night": "at night",
    "beach": "on the beach",
    "brick": "on a brick wall",
}

# Geometry in image units (the image spans [-1, 1]); pattern and stroke widths in pixels of a
# 32-pixel image, scaled with the size so a 64-pixel image shows the same picture, sharper.
_RADIUS = {"small": 0.44, "large": 0.68}
_CENTRE_X = {"left": -0.45, "middle": 0.0, "right": 0.45}
_MAX_TILT = np.deg2rad(12.0)  # beyond ~20 degrees a square starts to read as a diamond
_PATTERN_PERIOD = 4.0
_STROKE = 1.5
_FRAME = 2.5
_GRAIN = 0.10
_BASE = 32  # the size the constants above are written for


class Identity(NamedTuple):
    """An object identity: what a personalized concept is ("a green dotted star")."""

    shape: str
    colour: str
    pattern: str

    @property
    def words(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"


# Never seen by the pretrained toy model, so personalizing them is learning something new: nine
# shape-colour-pattern combinations of seen words, and one shape it never saw at all.
HELD_OUT_SHAPE = "moon"
HELD_OUT_IDENTITIES: tuple[Identity, ...] = (
    Identity("star", "green", "dotted"),
    Identity("heart", "blue", "striped"),
    Identity("square", "yellow", "checked"),
    Identity("circle", "purple", "striped"),
    Identity("triangle", "pink", "dotted"),
    Identity("cross", "orange", "checked"),
    Identity("ring", "red", "solid"),
    Identity("diamond", "teal", "striped"),
    Identity("heart", "orange", "solid"),
)


def _balanced_identities(per_shape: int, colour_offset: int) -> tuple[Identity, ...]:
    """per_shape identities for each shape but the held-out one: the j-th of shape s has colour
    s + 2j + colour_offset and pattern s + j (indices, cyclic). Every colour and every pattern is
    held out equally often, and no shape-colour pair is held out with more than one pattern, so
    every pair of words (shape-colour, shape-pattern, colour-pattern) still appears in pretraining:
    only the triple is new."""
    shapes = [s for s in SHAPES if s != HELD_OUT_SHAPE]
    return tuple(
        Identity(shape, COLOURS[(s + 2 * j + colour_offset) % len(COLOURS)],
                 PATTERNS[(s + j) % len(PATTERNS)])
        for s, shape in enumerate(shapes) for j in range(per_shape)
    )


# The toy model v2's held-out identities (core_jax/toyworld/model_v2.py): 32 test concepts for
# the benchmark's reported numbers and 16 validation concepts for choosing its settings (weights,
# steps) without looking at the test ones. Test colours sit an even number of steps from their
# shape's index, validation colours an odd number, so the two sets cannot overlap. The v2 model
# never sees any of these 48 triples (nor the moon): 208 of the 256 moonless identities remain.
# HELD_OUT_IDENTITIES above stays the shipped v1 model's set.
TEST_IDENTITIES: tuple[Identity, ...] = _balanced_identities(4, 0)
VALIDATION_IDENTITIES: tuple[Identity, ...] = _balanced_identities(2, 1)
V2_HELD_OUT_IDENTITIES: tuple[Identity, ...] = TEST_IDENTITIES + VALIDATION_IDENTITIES


@dataclasses.dataclass(frozen=True)
class Scenes:
    """N scenes: one int array [N] of value indices per attribute (see ATTRIBUTES)."""

    shape: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    size: np.ndarray
    position: np.ndarray
    background: np.ndarray
    style: np.ndarray

    def __len__(self) -> int:
        return len(self.shape)

    def labels(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def take(self, index: np.ndarray | slice) -> Scenes:
        return Scenes(**{name: values[index] for name, values in self.labels().items()})

    def row(self, i: int) -> dict[str, str]:
        """Scene i as words: {"shape": "star", ...}."""
        return {name: ATTRIBUTES[name][int(values[i])] for name, values in self.labels().items()}

    def identity(self, i: int) -> Identity:
        row = self.row(i)
        return Identity(row["shape"], row["colour"], row["pattern"])

    @staticmethod
    def from_words(rows: Sequence[Mapping[str, str]]) -> Scenes:
        return Scenes(**{
            name: np.array([values.index(r[name]) for r in rows], np.int32)
            for name, values in ATTRIBUTES.items()
        })


def _index(name: str, word: str) -> int:
    return ATTRIBUTES[name].index(word)


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    *,
    exclude: Sequence[Identity] = (),
    shapes: Sequence[str] = SHAPES,
    fixed: Mapping[str, str] | None = None,
) -> Scenes:
    """n scenes drawn uniformly from the allowed values; identities in `exclude` are redrawn
    (their other attributes too) until none is left. `fixed` pins attributes to one word."""
    fixed = dict(fixed or {})
    allowed = {name: np.arange(len(values)) for name, values in ATTRIBUTES.items()}
    allowed["shape"] = np.array([_index("shape", s) for s in shapes])
    for name, word in fixed.items():
        allowed[name] = np.array([_index(name, word)])
    excluded = np.array(
        [[_index(a, getattr(i, a)) for a in IDENTITY_ATTRIBUTES] for i in exclude], np.int32
    ).reshape(-1, 3)

    def draw(m: int) -> dict[str, np.ndarray]:
        return {name: rng.choice(values, m).astype(np.int32) for name, values in allowed.items()}

    labels = draw(n)
    while True:
        triples = np.stack([labels[a] for a in IDENTITY_ATTRIBUTES], axis=1)
        bad = (triples[:, None, :] == excluded[None]).all(-1).any(-1)
        if not bad.any():
            return Scenes(**labels)
        redraw = draw(int(bad.sum()))
        for name in labels:
            labels[name][bad] = redraw[name]


def concept_scenes(
    identity: Identity,
    rng: np.random.Generator,
    n: int,
    background: str = "white",
    style: str = "flat",
) -> Scenes:
    """A concept's training photos: its identity in one plain context, size and place varying."""
    return sample_scenes(
        rng, n,
        fixed={"shape": identity.shape, "colour": identity.colour, "pattern": identity.pattern,
               "background": background, "style": style},
    )


def concept_images(
    identity: Identity,
    n: int = 5,
    size: int = 32,
    seed: int = 0,
    background: str = "white",
    style: str = "flat",
) -> list[np.ndarray]:
    """A concept's n photos, uint8 [size, size, 3] each (see `concept_scenes`)."""
    rng = np.random.default_rng(seed)
    return list(render(concept_scenes(identity, rng, n, background, style), size, rng))


# --- Shapes: signed distance in the object's unit frame (radius about 1), negative inside ------


def _box(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _polygon(x: np.ndarray, y: np.ndarray, normal_angles: Sequence[float], h: float):
    """Convex polygon as the intersection of half-planes (exact inside, close enough outside
    for a one-pixel anti-aliasing ramp)."""
    return np.max([np.cos(a) * x + np.sin(a) * y for a in normal_angles], axis=0) - h


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Five points; the radius falls linearly in angle from 1 at a point to 0.42 between points.
    angle = np.arctan2(x, -y)  # 0 = straight up (image y points down)
    phase = np.mod(angle * 5 / (2 * np.pi), 1.0)
    reach = 0.42 + 0.58 * np.abs(1.0 - 2.0 * phase)
    return (np.hypot(x, y) - reach) * 0.6  # 0.6: the spikes' slopes make the raw distance long


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    lobes = np.minimum(np.hypot(x - 0.45, y + 0.3), np.hypot(x + 0.45, y + 0.3)) - 0.47
    point = np.maximum(0.8 * np.abs(x) + 0.6 * y - 0.57, -(y + 0.1))
    return np.minimum(lobes, point)


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return np.hypot(x, y) - 0.95
    if shape == "square":
        return _box(x, y, 0.8, 0.8)
    if shape == "triangle":  # apex up; normals of the base and the two sides
        return _polygon(x, y, (np.pi / 2, -np.pi / 6, -5 * np.pi / 6), 0.5) * 1.6
    if shape == "star":
        return _star(x, y)
    if shape == "heart":
        return _heart(x, y)
    if shape == "cross":
        return np.minimum(_box(x, y, 0.92, 0.3), _box(x, y, 0.3, 0.92))
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.68) - 0.27
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) * 0.85 - 0.95) * 0.75
    if shape == "moon":
        return np.maximum(np.hypot(x, y) - 0.95, 0.78 - np.hypot(x - 0.48, y + 0.22))
    raise ValueError(f"unknown shape {shape!r}")


# --- Backgrounds: [n, S, S, 3] in [0, 1] ---------------------------------------------------------


def _cells(values: np.ndarray, size: int) -> np.ndarray:
    """Noise drawn on a 32-cell grid [n, 32, 32, ...] blown up to [n, size, size, ...]: grain,
    flakes and stars look the same at every size, so a 64-pixel image pooled to 32 pixels
    is the 32-pixel image's twin."""
    factor = -(-size // _BASE)  # ceil: any size works, multiples of 32 exactly
    return np.repeat(np.repeat(values, factor, axis=1), factor, axis=2)[:, :size, :size]


def _background(name: str, n: int, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = grid.shape[0]
    v = grid[None, :, None]  # image y in [-1, 1], down
    u = grid[None, None, :]
    shape = (n, size, size)
    cells = (n, _BASE, _BASE)

    def fill(rgb: Sequence[float]) -> np.ndarray:
        return np.broadcast_to(np.asarray(rgb, np.float32), shape + (3,)).copy()

    def where(mask: np.ndarray, rgb: Sequence[float], image: np.ndarray) -> np.ndarray:
        return np.where(mask[..., None], np.asarray(rgb, np.float32), image)

    if name == "white":
        return fill((0.96, 0.96, 0.96))
    if name == "black":
        return fill((0.05, 0.05, 0.05))
    if name == "grass":
        horizon = 0.05 + 0.08 * np.sin(u * 3.0 + rng.uniform(0, 6.3, (n, 1, 1)))
        image = where(v > horizon, (0.18, 0.50, 0.15), fill((0.72, 0.86, 1.0)))
        blades = _cells(rng.uniform(-0.08, 0.08, cells), size) * (v > horizon)
        image[..., 1] += blades
        return image
    if name == "sky":
        t = (v + 1.0) / 2.0
        image = np.broadcast_to(
            (1 - t)[..., None] * np.float32([0.20, 0.45, 0.90])
            + t[..., None] * np.float32([0.55, 0.78, 1.0]), shape + (3,),
        ).copy()
        for _ in range(2):  # clouds: flat white ellipses
            cx = rng.uniform(-0.9, 0.9, (n, 1, 1))
            cy = rng.uniform(-0.85, 0.6, (n, 1, 1))
            cloud = ((u - cx) / 0.35) ** 2 + ((v - cy) / 0.14) ** 2 < 1.0
            image = where(cloud, (0.97, 0.97, 1.0), image)
        return image
    if name == "snow":
        image = where(v > 0.45, (0.93, 0.95, 0.98), fill((0.55, 0.62, 0.74)))
        flakes = _cells(rng.random(cells) < 0.10, size)
        return where(flakes, (1.0, 1.0, 1.0), image)
    if name == "night":
        stars = _cells(rng.random(cells) < 0.035, size)
        return where(stars, (1.0, 0.95, 0.6), fill((0.04, 0.06, 0.22)))
    if name == "beach":
        shore = -0.05 + 0.05 * np.sin(u * 4.0 + rng.uniform(0, 6.3, (n, 1, 1)))
        return where(v > shore, (0.92, 0.82, 0.55), fill((0.10, 0.45, 0.78)))
    if name == "brick":
        row_px = size / 8
        yy, xx = (grid[:, None] + 1) * size / 2, (grid[None, :] + 1) * size / 2
        row = np.floor(yy / row_px)
        xs = xx + (row % 2) * row_px  # alternate rows offset by half a brick
        scale = size / _BASE
        mortar = (np.mod(yy, row_px) < scale) | (np.mod(xs, 2 * row_px) < scale)
        return where(np.broadcast_to(mortar, shape), (0.80, 0.77, 0.72), fill((0.62, 0.26, 0.18)))
    raise ValueError(f"unknown background {name!r}")


def render(scenes: Scenes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the scenes: uint8 [N, size, size, 3]. Same scenes, size and generator state, same
    pixels."""
    return render_with_masks(scenes, size, rng)[0]


def render_with_masks(
    scenes: Scenes, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`render`'s images and each object's coverage, float32 [N, size, size] in [0, 1] (the
    anti-aliased fill, before outlines, frames and grain)."""
    n = len(scenes)
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
    px = size / 2.0  # pixels per image unit
    scale = size / _BASE

    # Per-scene placement: jittered centre, radius and tilt.
    radius = np.array([_RADIUS[s] for s in SIZES], np.float32)[scenes.size]
    radius = radius * rng.uniform(0.93, 1.07, n).astype(np.float32)
    cx = np.array([_CENTRE_X[p] for p in POSITIONS], np.float32)[scenes.position]
    cx = cx + rng.uniform(-0.05, 0.05, n).astype(np.float32)
    cy = rng.uniform(-0.08, 0.08, n).astype(np.float32)
    tilt = rng.uniform(-_MAX_TILT, _MAX_TILT, n).astype(np.float32)

    du = grid[None, None, :] - cx[:, None, None]  # [n, 1, S] -> broadcast [n, S, S]
    dv = grid[None, :, None] - cy[:, None, None]
    du, dv = np.broadcast_arrays(du, dv)
    cos, sin = np.cos(tilt)[:, None, None], np.sin(tilt)[:, None, None]
    x = (cos * du + sin * dv) / radius[:, None, None]
    y = (-sin * du + cos * dv) / radius[:, None, None]

    distance = np.empty((n, size, size), np.float32)  # signed distance in pixels
    for k, shape in enumerate(SHAPES):
        rows = scenes.shape == k
        if rows.any():
            distance[rows] = _shape_distance(shape, x[rows], y[rows]) * (
                radius[rows, None, None] * px
            )
    sketch = scenes.style == _index("style", "sketch")
    if sketch.any():  # ragged, hand-drawn edges
        distance[sketch] += _cells(
            rng.normal(0.0, 0.5 * scale, (int(sketch.sum()), _BASE, _BASE)), size
        )
    alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]

    # Patterns live in the object's frame (they tilt and move with it), in pixels.
    period = _PATTERN_PERIOD * scale
    ox, oy = x * radius[:, None, None] * px, y * radius[:, None, None] * px
    marks = np.zeros((n, size, size), bool)
    for k, pattern in enumerate(PATTERNS):
        rows = scenes.pattern == k
        if pattern == "solid" or not rows.any():
            continue
        a, b = ox[rows] / period, oy[rows] / period
        if pattern == "striped":
            marks[rows] = np.mod(a + b, 1.0) < 0.5
        elif pattern == "dotted":
            marks[rows] = np.hypot(np.mod(a, 1.0) - 0.5, np.mod(b, 1.0) - 0.5) < 0.3
        else:  # checked, squares of 3/4 of a period: big enough to survive 32 pixels
            marks[rows] = (np.floor(a / 0.75) + np.floor(b / 0.75)) % 2 == 1
    base = _COLOUR_TABLE[scenes.colour]  # [n, 3]
    # Marks are darker on light colours and lighter on dark ones, so they show on every colour.
    dark = (base @ _LUMA < 0.45)[:, None]
    mark = np.where(dark, base + (1.0 - base) * 0.6, base * 0.35)
    fill = np.where(marks[..., None], mark[:, None, None], base[:, None, None])

    background = np.empty((n, size, size, 3), np.float32)
    for k, name in enumerate(BACKGROUNDS):
        rows = scenes.background == k
        if rows.any():
            background[rows] = _background(name, int(rows.sum()), grid, rng)
    image = background * (1.0 - alpha) + fill * alpha

    # Strokes contrast with the background: black on light ones, white on dark ones.
    light = background.mean(axis=(1, 2)) @ _LUMA > 0.35
    ink = np.where(light[:, None], 0.0, 1.0).astype(np.float32)[:, None, None]
    outline = scenes.style == _index("style", "outline")
    if outline.any():
        # Outside the edge only: the fill, and so colour and pattern, stay whole.
        d = distance[outline]
        band = np.clip(np.minimum(d + 0.5, _STROKE * scale + 0.5 - d), 0.0, 1.0)
        image[outline] = image[outline] * (1 - band[..., None]) + ink[outline] * band[..., None]
    framed = scenes.style == _index("style", "framed")
    if framed.any():
        edge = np.minimum(1.0 - np.abs(grid[:, None]), 1.0 - np.abs(grid[None, :])) * px
        border = (edge < _FRAME * scale)[None, ..., None]
        image[framed] = np.where(border, ink[framed], image[framed])
    if sketch.any():  # pencil grain over everything
        grain = _cells(rng.normal(0.0, _GRAIN, (int(sketch.sum()), _BASE, _BASE, 1)), size)
        image[sketch] = image[sketch] + grain
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), alpha[..., 0]


def generate(
    seed: int, n: int, size: int = 32, **sample_kwargs
) -> tuple[np.ndarray, Scenes]:
    """n random scenes and their images, both a function of the seed alone."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, **sample_kwargs)
    return render(scenes, size, rng), scenes


# --- Captions -----------------------------------------------------------------------------------


def caption(row: Mapping[str, str], keep: Sequence[str] | None = None) -> str:
    """One scene's caption; only the attributes in `keep` (all by default) are mentioned, the
    shape always (it is the noun). "a large red striped star on the left on grass, sketch style"
    """
    keep = set(ATTRIBUTES if keep is None else keep) | {"shape"}
    words = ["a"] + [row[a] for a in ("size", "colour", "pattern") if a in keep] + [row["shape"]]
    if "position" in keep:
        words.append(_POSITION_PHRASES[row["position"]])
    if "background" in keep:
        words.append(_BACKGROUND_PHRASES[row["background"]])
    text = " ".join(words)
    return f"{text}, {row['style']} style" if "style" in keep else text


def random_captions(
    scenes: Scenes, rng: np.random.Generator, keep_p: float = 0.7
) -> list[str]:
    """Captions that mention each attribute with probability keep_p, so that the model also
    learns what an unmentioned attribute means (anything) and short prompts make sense."""
    keep = rng.random((len(scenes), len(ATTRIBUTES))) < keep_p
    names = list(ATTRIBUTES)
    return [
        caption(scenes.row(i), [a for a, k in zip(names, keep[i], strict=True) if k])
        for i in range(len(scenes))
    ]


# Every value's name is the word its phrase uses ("on a brick wall" -> brick).
_WORD_TO_ATTRIBUTE = {w: (a, w) for a, values in ATTRIBUTES.items() for w in values}
assert len(_WORD_TO_ATTRIBUTE) == sum(map(len, ATTRIBUTES.values())), "a word names two values"


def identity_from_words(text: str) -> Identity:
    """ "green dotted star" (or "green_dotted_star") -> Identity("star", "green", "dotted")."""
    parsed = parse_caption(text.replace("_", " "))
    if set(parsed) != set(IDENTITY_ATTRIBUTES):
        raise ValueError(
            f"{text!r} is not a toy-world identity: name one colour, one pattern and one shape, "
            f"e.g. 'green dotted star' (colours {', '.join(COLOURS)}; patterns "
            f"{', '.join(PATTERNS)}; shapes {', '.join(SHAPES)})"
        )
    return Identity(parsed["shape"], parsed["colour"], parsed["pattern"])


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption mentions, {"shape": "star", "style": "sketch", ...}."""
    found: dict[str, str] = {}
    for word in text.replace(",", " ").split():
        if word in _WORD_TO_ATTRIBUTE:
            attribute, value = _WORD_TO_ATTRIBUTE[word]
            if attribute in found and found[attribute] != value:
                raise ValueError(f"{text!r} names two {attribute}s: {found[attribute]}, {value}")
            found[attribute] = value
    return found

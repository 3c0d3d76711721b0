"""Tests for core_jax.data: loading, built-in concepts, augmentation, grids."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from core_jax import data
from core_jax.errors import InputError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _split(size, top, bottom):
    """RGB image, `top` colour in the upper half, `bottom` in the lower half."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2] = top
    arr[h // 2 :] = bottom
    return Image.fromarray(arr)


def _noise(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _load(folder, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = data.load_concept_images(folder, **kwargs)
    return images, [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------------
# Loading


def test_formats_sorted_case_insensitive(tmp_path):
    colours = {"c.webp": (0, 200, 0), "a.JPG": (200, 0, 0), "b.png": (0, 0, 200)}
    for name, colour in colours.items():
        Image.new("RGB", (24, 16), colour).save(tmp_path / name, quality=95, lossless=True)
    images, messages = _load(tmp_path)
    assert messages == []
    assert len(images) == 3
    for img, name in zip(images, sorted(colours), strict=True):
        assert img.dtype == np.uint8 and img.shape == (16, 24, 3)
        # Grey levels, not fp32: JPEG (quality 95) may move a flat colour by a level or two
        # (WebP lossless and PNG are exact); a wrong channel order is off by 200.
        np.testing.assert_allclose(img.mean(axis=(0, 1)), colours[name], atol=3)


def test_exif_orientation_is_applied(tmp_path):
    upright = _split((20, 40), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90° clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "p.jpg", exif=exif, quality=95)
    (img,), _ = _load(tmp_path)
    assert img.shape == (40, 20, 3)
    # JPEG ringing near the colour edge: a few levels (1 seen); unrotated, these pixels would
    # hold the other colour, 255 levels away.
    np.testing.assert_allclose(img[5, 10], RED, atol=30)
    np.testing.assert_allclose(img[35, 10], BLUE, atol=30)


def test_transparency_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 4:6] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 6:] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "b.png", transparency=1)
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "c.png")

    (a, b, c), _ = _load(tmp_path)
    assert (a[:, :4] == BLUE).all()
    assert (a[:, 4:6] == 255).all()
    assert np.abs(a[:, 6:].astype(int) - 127).max() <= 1
    assert (b == 255).all()
    assert (c[:, 4:6] == 255).all() and (c[:, :4] == 0).all()


def test_grayscale_and_16bit(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    Image.fromarray(gray, "L").save(tmp_path / "a.png")
    deep = np.array([[0, 257 * 128, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "b.png")
    (a, b), _ = _load(tmp_path)
    assert a.shape == (4, 16, 3) and (a == gray[..., None]).all()
    assert b.dtype == np.uint8 and b.shape == (1, 3, 3)
    assert b[0, :, 0].tolist() == [0, 128, 255]
    assert (b == b[..., :1]).all()


def test_bad_files_skipped_with_warning(tmp_path):
    Image.fromarray(_noise()).save(tmp_path / "good.png")
    buf = io.BytesIO()
    Image.fromarray(_noise(seed=1)).save(buf, format="JPEG")
    (tmp_path / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.txt").write_text("a cat")
    (tmp_path / "fake.png").write_text("not a png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "sub").mkdir()

    images, messages = _load(tmp_path)
    assert len(images) == 1 and images[0].shape == (64, 64, 3)
    for name in ("broken.jpg", "notes.txt", "fake.png"):
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert len(messages) == 3  # hidden files and folders pass silently


def test_only_bad_files_is_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a cat")
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="fake.jpg.*notes.txt"):
        data.load_concept_images(tmp_path)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        data.load_concept_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="is empty"):
        data.load_concept_images(empty)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(InputError, match="not a directory"):
        data.load_concept_images(tmp_path / "file.png")


def test_small_image_warns(tmp_path):
    Image.fromarray(_noise(32, 48)).save(tmp_path / "small.png")
    (img,), messages = _load(tmp_path, min_size=64)
    assert img.shape == (32, 48, 3)
    assert len(messages) == 1 and "small.png" in messages[0] and "upscaled" in messages[0]
    assert _load(tmp_path, min_size=32)[1] == []


@pytest.mark.parametrize("name", ["big.png", "big.jpg"])
def test_large_image_downscaled(tmp_path, name):
    Image.fromarray(_noise(200, 300)).save(tmp_path / name)
    (img,), messages = _load(tmp_path, max_pixels=6000)
    h, w = img.shape[:2]
    assert h * w <= 6000 and abs(w / h - 1.5) < 0.1
    assert len(messages) == 1 and "300x200" in messages[0] and "downscaled" in messages[0]


def test_decompression_bomb_skipped(tmp_path, monkeypatch):
    Image.fromarray(_noise(100, 100)).save(tmp_path / "bomb.png")
    Image.fromarray(_noise(10, 10)).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (img,), messages = _load(tmp_path)
    assert img.shape == (10, 10, 3)
    assert len(messages) == 1 and "bomb.png" in messages[0]


# --------------------------------------------------------------------------------------------
# Built-in concepts


@pytest.mark.parametrize("name", list(data.BUILTIN_CONCEPTS))
def test_builtin_concept(name):
    images = data.builtin_concept(name)
    assert 3 <= len(images) <= 6
    for img in images:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
        assert min(img.shape[:2]) >= 100
    for i in range(len(images)):
        for j in range(i):
            a, b = images[i], images[j]
            assert a.shape != b.shape or not np.array_equal(a, b)


def test_builtin_concept_default_and_unknown():
    assert len(data.builtin_concept()) == len(data.builtin_concept("chelsea"))
    assert data.BUILTIN_CONCEPTS["coffee"].animate is False
    with pytest.raises(InputError, match="chelsea"):
        data.builtin_concept("dog")


# --------------------------------------------------------------------------------------------
# Augmentation


def test_augmented_views_shape_range_determinism():
    images = [_noise(60, 90), _noise(80, 40, seed=1), _noise(50, 50, seed=2)]
    a = data.augmented_views(images, 7, 32, seed=3)
    assert a.shape == (7, 32, 32, 3) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert np.array_equal(a, data.augmented_views(images, 7, 32, seed=3))
    assert not np.array_equal(a, data.augmented_views(images, 7, 32, seed=4))


def test_augmented_views_cycle_through_images():
    colours = [(255, 0, 0), (0, 255, 0)]
    images = [np.full((40, 60, 3), c, np.uint8) for c in colours]
    views = data.augmented_views(images, 5, 16, seed=0, rotate_p=0.0)
    for i, view in enumerate(views):
        expected = np.array(colours[i % 2]) / 127.5 - 1.0
        # A flat image resamples to the same integers; x / 127.5 - 1 in fp32 rounds twice on
        # values <= 1 (<= 1.2e-7). One grey level off is 7.8e-3.
        np.testing.assert_allclose(view, np.broadcast_to(expected, view.shape), atol=1e-6)


def test_augmented_views_shrinks_large_inputs_consistently():
    # The pre-shrink of large photos must not change the geometry: compare against no shrink.
    big = np.repeat(np.repeat(_noise(10, 15), 32, axis=0), 32, axis=1)  # 320x480, blocky
    ref = data.augmented_views([big], 4, 160, seed=1)  # shorter side 320 = 2x: not shrunk
    shrunk = data.augmented_views([big], 4, 80, seed=1)  # shorter side 4x: shrunk first
    small_ref = np.asarray(
        [np.asarray(Image.fromarray(data.to_uint8(v)).resize((80, 80))) for v in ref]
    )
    assert np.abs(data.to_uint8(shrunk).astype(int) - small_ref).mean() < 15


def test_augment_probabilities():
    rng = np.random.default_rng(0)
    draws = [data.sample_augment_params(rng) for _ in range(4000)]
    angles = np.array([d.angle for d in draws])
    rotated = angles != 0.0
    assert abs(rotated.mean() - 0.75) < 0.03
    assert abs(np.mean([d.flip for d in draws]) - 0.25) < 0.03
    assert np.abs(angles).max() <= 45.0
    assert angles.min() < -40 and angles.max() > 40
    assert abs(angles[rotated].mean()) < 2.0
    crops = np.array([(d.crop_x, d.crop_y) for d in draws])
    assert crops.min() >= 0.0 and crops.max() < 1.0


def test_apply_augment_flip_crop_rotate():
    img = Image.fromarray(_noise(48, 48))
    plain = data.apply_augment(img, data.AugmentParams(0.0, False, 0.0, 0.0), 48)
    flipped = data.apply_augment(img, data.AugmentParams(0.0, True, 0.0, 0.0), 48)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    np.testing.assert_array_equal(data.to_uint8(plain), np.asarray(img))

    # Shorter side goes to the resolution; the crop slides along the longer one.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32], wide[:, 32:] = RED, BLUE
    wide = Image.fromarray(wide)
    left = data.apply_augment(wide, data.AugmentParams(0.0, False, 0.0, 0.5), 16)
    right = data.apply_augment(wide, data.AugmentParams(0.0, False, 0.999, 0.5), 16)
    # Resampling near the colour edge may blend in a few levels (0.05 = 3 levels); the wrong
    # crop would give the other colour, 2.0 away.
    np.testing.assert_allclose(left[8, 2], np.array(RED) / 127.5 - 1, atol=0.05)
    np.testing.assert_allclose(right[8, -3], np.array(BLUE) / 127.5 - 1, atol=0.05)

    # Expanded corners are white; the middle stays the (black) image.
    black = Image.new("RGB", (40, 40))
    rot = data.apply_augment(black, data.AugmentParams(45.0, False, 0.0, 0.0), 40)
    np.testing.assert_array_equal(rot[0, 0], 1.0)  # the fill is 255 exactly: 255 / 127.5 - 1
    # The rotated black square, resampled: at most a level off (0.02 = 1.3 levels).
    np.testing.assert_allclose(rot[20, 20], -1.0, atol=0.02)


def test_augment_uses_only_the_generator():
    img = _noise(30, 50)
    a = data.augment(img, 24, np.random.default_rng(5))
    np.random.seed(123)  # the legacy global state must not matter
    b = data.augment(img, 24, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == (24, 24, 3)


# --------------------------------------------------------------------------------------------
# Grids


def test_save_image_grid(tmp_path):
    views = np.random.default_rng(0).uniform(-1, 1, (5, 8, 6, 3)).astype(np.float32)
    path = tmp_path / "out" / "grid.png"
    assert data.save_image_grid(views, path, nrow=3) == path
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8 + 2, 3 * 6 + 2 * 2, 3)
    expected = data.to_uint8(views)
    np.testing.assert_array_equal(grid[:8, :6], expected[0])
    np.testing.assert_array_equal(grid[10:, 8:14], expected[4])
    assert (grid[10:, 16:] == 255).all()  # empty slot stays white

    data.save_image_grid(expected[:4], path)  # uint8 input, overwrite, default 2x2
    assert np.asarray(Image.open(path)).shape == (18, 14, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError):
        data.save_image_grid(np.zeros((2, 4, 4)), path)


def test_to_uint8_endpoints():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32)
    assert data.to_uint8(x).tolist() == [0, 0, 128, 255, 255]

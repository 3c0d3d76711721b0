"""`core_jax.eval`: preprocessing equal to transformers' image processors, CLIP-T / CLIP-I /
DINO from our Flax models equal to the torch reference, and `core-jax score` end to end, on
tiny random CLIP / DINO models saved here with `save_pretrained`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data as skimage_data

from core_jax import metrics
from core_jax.errors import InputError
from core_jax.eval import preprocess, scores
from core_jax.eval.score_folder import score_folder
from core_jax.text import load_tokenizer


def _processor(name: str):
    """transformers 5.x names the PIL/numpy backend `<Name>Pil` (the default one needs
    torchvision); in 4.x `<Name>` is that backend."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _photos():
    """scikit-image's photos (chelsea 451 x 300, astronaut 512 x 512, coffee 600 x 400) and
    resized copies: portrait, a scaled side that is not a whole number, smaller than 224."""
    photos = {"chelsea": skimage_data.chelsea(), "astronaut": skimage_data.astronaut(),
              "coffee": skimage_data.coffee()}
    for width, height in [(200, 301), (500, 223), (97, 64)]:
        photos[f"coffee_{width}x{height}"] = np.asarray(
            Image.fromarray(photos["coffee"]).resize((width, height), Image.BILINEAR))
    return photos


# DINO v1 and DINOv2 folders' preprocessor_config.json as published for facebook/dino-vits16
# (the legacy feature-extractor form: a bare int size, square for ViT) and facebook/dinov2-*.
DINO_V1_CONFIG = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": list(preprocess.IMAGENET_MEAN), "image_std": list(preprocess.IMAGENET_STD),
    "resample": 2, "size": 224,
}
DINO_V2_CONFIG = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": list(preprocess.IMAGENET_MEAN), "image_processor_type": "BitImageProcessor",
    "image_std": list(preprocess.IMAGENET_STD), "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


@pytest.mark.parametrize(("family", "config", "processor"), [
    ("clip", None, lambda: _processor("CLIPImageProcessor")()),
    ("vit", DINO_V1_CONFIG, lambda: _processor("ViTImageProcessor")(
        size={"height": 224, "width": 224}, resample=2, image_mean=list(preprocess.IMAGENET_MEAN),
        image_std=list(preprocess.IMAGENET_STD))),
    ("vit", None, None),  # the family default is dino-vits16's published processor
    ("dinov2", DINO_V2_CONFIG, lambda: _processor("BitImageProcessor")(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(preprocess.IMAGENET_MEAN), image_std=list(preprocess.IMAGENET_STD))),
    ("dinov2", None, None),
], ids=["clip", "dino_v1", "dino_v1_default", "dinov2", "dinov2_default"])
def test_preprocessing_is_transformers_image_processor(tmp_path, family, config, processor):
    if config is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = preprocess.from_folder(tmp_path, family, 224)
    if processor is None:  # no file: the same numbers as the published file gives
        (tmp_path / "preprocessor_config.json").write_text(
            json.dumps(DINO_V1_CONFIG if family == "vit" else DINO_V2_CONFIG))
        reference = preprocess.from_folder(tmp_path, family, 224)
        assert ours == reference
        return
    processor = processor()
    for name, photo in _photos().items():
        want = processor(images=[photo], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = ours([photo])
        assert got.shape == want.shape == (1, 224, 224, 3), name
        # Both resize the uint8 photo with PIL's filter to the same size and crop the same
        # window, so the pixels are the same integers; scaling and normalisation differ by at
        # most an ulp or two of values <= 2.7 (~5e-7). One grey level off is 1/255/0.27 = 1.5e-2.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8)).save_pretrained(folder)
    return folder


def _images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# Cosines of unit vectors computed from the same pixels by our Flax models and the torch ones:
# the embeddings agree to ~1e-6 (tests/test_vision_models.py), and a cosine of D = 16 or 32
# terms moves by at most 2 sqrt(D) times that: <= 1.2e-5. A wrong embedding (unprojected, the
# wrong token, unnormalised) moves it by 1e-2 or more.
COSINE_ATOL = 2e-5


def test_clip_scores_equal_the_torch_reference(clip_folder):
    ours = scores.ClipEmbedder(clip_folder, batch_size=2)
    reference = metrics.ClipScorer(clip_folder)
    images, photos = _images(3, seed=1), _images(2, size=40, seed=2)
    prompts = ["a dog in the snow", "a red cat", "a teapot, watercolor"]
    generated = ours.images(list(images))
    np.testing.assert_allclose(scores.clip_t(generated, ours.texts(prompts)).mean(),
                               metrics.clip_t(reference, images, prompts), atol=COSINE_ATOL)
    np.testing.assert_allclose(
        scores.mean_similarity(generated, ours.images(list(photos))).mean(),
        metrics.image_similarity(reference, images, photos), atol=COSINE_ATOL)
    # CLIPModel's own normalised embeddings, whose names are the same in transformers 4.x and
    # 5.x (get_image_features changed its return type between them).
    pixels = torch.from_numpy(metrics.preprocess(images, 32, preprocess.CLIP_MEAN,
                                                 preprocess.CLIP_STD))
    tokens = reference.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = reference.model(pixel_values=pixels, **tokens)
    np.testing.assert_allclose(generated, out.image_embeds.numpy(), atol=COSINE_ATOL)
    np.testing.assert_allclose(ours.texts(prompts), out.text_embeds.numpy(), atol=COSINE_ATOL)


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(2)
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, mlp_ratio=2, num_hidden_layers=1, num_attention_heads=2, image_size=56,
        patch_size=14)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["dino", "dinov2"])
def test_dino_score_equals_the_torch_class_tokens(request, kind):
    """DINO v1 at its own 32 px; DINOv2 on its processor's 224 px crops (16 x 16 patches from
    a 4 x 4 position table, interpolated)."""
    folder = request.getfixturevalue(f"{kind}_folder")
    ours = scores.DinoEmbedder(folder, batch_size=4)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    a, b = _images(2, seed=3), _images(3, size=40, seed=4)

    def class_tokens(images):
        pixels = ours.images.processing(list(images)).transpose(0, 3, 1, 2)
        with torch.no_grad():
            cls = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls, dim=-1).numpy()

    want = (class_tokens(a) @ class_tokens(b).T).mean()
    got = scores.mean_similarity(ours.images(list(a)), ours.images(list(b))).mean()
    np.testing.assert_allclose(got, want, atol=COSINE_ATOL)
    assert ours.images.processing(list(a)).shape[1:3] == ((224, 224) if kind == "dinov2"
                                                           else (32, 32))


def test_batches_are_padded_to_one_shape_and_compiled_once(clip_folder):
    ours = scores.ClipEmbedder(clip_folder, batch_size=2)
    images = list(_images(5, seed=5))
    sliced = ours.images(images)  # 2 + 2 + 1 (padded to 2)
    assert ours.images._fn._cache_size() == 1
    whole = scores.ClipEmbedder(clip_folder, batch_size=8).images(images)
    # The same model on zero-padded batches: rows are independent, only XLA's blocking of the
    # matrix products may differ (a few ulp of O(1) activations).
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=2e-6)
    assert sliced.shape == (5, 16)


@pytest.mark.parametrize(("prompt", "class_word", "want"), [
    ("a S* dog in the jungle", "dog", "a dog in the jungle"),
    ("a photo of S* on the beach", "stuffed animal", "a photo of stuffed animal on the beach"),
    ("a S* stuffed animal", "stuffed animal", "a stuffed animal"),
    ("a S* dog", "", "a dog"),
    ("a S* doghouse", "dog", "a dog doghouse"),
    ("S*", "a\\1", "a\\1"),
])
def test_clip_t_text(prompt, class_word, want):
    assert scores.clip_t_text(prompt, "S*", class_word) == want


def _folder(tmp_path: Path, n: int = 3) -> tuple[Path, Path, Path]:
    images, references = tmp_path / "images", tmp_path / "refs"
    images.mkdir()
    references.mkdir()
    rows = []
    for i, image in enumerate(_images(n, size=40, seed=6)):
        Image.fromarray(image).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"a S* dog number {i}"})
    for i, image in enumerate(_images(2, size=56, seed=7)):
        Image.fromarray(image).save(references / f"{i}.jpg")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images, prompts, references


def test_score_folder_writes_per_image_rows_and_means(tmp_path, clip_folder, dino_folder):
    images, prompts, references = _folder(tmp_path)
    lines = []
    results = score_folder(images, prompts, references, clip_folder, dino_folder,
                           class_word="dog", batch_size=2, echo=lines.append)
    rows = [json.loads(line) for line in (images / "scores.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["0.png", "1.png", "2.png"]
    assert rows[1]["clip_t_text"] == "a dog number 1"
    for key in ("clip_t", "clip_i", "dino"):
        assert results[key] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-12)
    assert json.loads((images / "results.json").read_text()) == results
    assert results["images"] == 3 and results["references"] == 2
    assert lines[0].startswith("CLIP-T ") and "(3 images, 2 references;" in lines[0]
    # The torch reference on the same files.
    reference = metrics.ClipScorer(clip_folder)
    pixels = np.stack([np.asarray(Image.open(images / f"{i}.png")) for i in range(3)])
    photos = np.stack([np.asarray(Image.open(p)) for p in sorted(references.iterdir())])
    want = metrics.clip_t(reference, pixels, [r["clip_t_text"] for r in rows])
    assert results["clip_t"] == pytest.approx(want, abs=COSINE_ATOL)
    assert results["clip_i"] == pytest.approx(metrics.image_similarity(reference, pixels, photos),
                                              abs=COSINE_ATOL)


def test_preflight_reports_every_problem_one_line_each(tmp_path, clip_folder, dino_folder):
    images, prompts, references = _folder(tmp_path)
    (images / "1.png").unlink()
    prompts.write_text(prompts.read_text() + "not json\n")
    with pytest.raises(InputError) as err:
        score_folder(images, prompts, tmp_path / "nope", dino_folder, clip_folder,
                     class_word=" ")
    lines = str(err.value).split("\ncore-jax: ")
    assert len(lines) == 5, lines
    assert lines[0].endswith("no image " + str(images / "1.png"))
    assert "line 4: expected a JSON object" in lines[1]
    assert lines[2] == f"--references {tmp_path / 'nope'} is not a folder"
    assert lines[3] == (f"--clip: {dino_folder} is not a CLIP model folder: its config.json "
                        "says model_type 'vit', expected clip")
    assert lines[4].startswith("--dino: ")
    assert lines[4].endswith("model_type 'clip', expected vit or dinov2")
    with pytest.raises(InputError, match="class word ' ' gives no tokens"):
        (images / "1.png").write_bytes((images / "0.png").read_bytes())
        prompts.write_text(prompts.read_text().replace("not json\n", ""))
        score_folder(images, prompts, references, clip_folder, dino_folder, class_word=" ")
    assert not (images / "scores.jsonl").exists()


def test_score_command_exit_codes(tmp_path, clip_folder, dino_folder):
    images, prompts, references = _folder(tmp_path, n=2)

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "core_jax", "score", *flags],
                              capture_output=True, text=True, timeout=300)

    bad = run("--images", str(images), "--prompts", str(prompts), "--references",
              str(tmp_path / "nope"), "--clip", str(tmp_path), "--dino", str(dino_folder))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"core-jax: --references {tmp_path / 'nope'} is not a folder",
        f"core-jax: --clip: CLIP model folder {tmp_path} has no config.json",
    ]
    good = run("--images", str(images), "--prompts", str(prompts), "--references",
               str(references), "--clip", str(clip_folder), "--dino", str(dino_folder),
               "--class_word", "dog", "--out", str(tmp_path / "out"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("CLIP-T ")
    assert len((tmp_path / "out" / "scores.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("CORE_JAX_CLIP_PATH")
                         and os.environ.get("CORE_JAX_DINO_PATH")),
                    reason="set CORE_JAX_CLIP_PATH and CORE_JAX_DINO_PATH to real model folders")
def test_real_weights_equal_transformers_on_photos():
    clip_path, dino_path = os.environ["CORE_JAX_CLIP_PATH"], os.environ["CORE_JAX_DINO_PATH"]
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    prompts = ["a photo of an astronaut", "a photo of a cat", "a photo of a cup of coffee"]
    clip = scores.ClipEmbedder(clip_path, batch_size=4)
    ours = scores.clip_t(clip.images(photos), clip.texts(prompts))
    reference = metrics.ClipScorer(clip_path)
    want = [metrics.clip_t(reference, photo[None], [prompt])
            for photo, prompt in zip(photos, prompts, strict=True)]
    # Real models: 24 layers of width 1024; fp32 embeddings agree to ~1e-5, cosines the same.
    np.testing.assert_allclose(ours, want, atol=1e-4)
    matrix = clip.images(photos) @ clip.texts(prompts).T
    assert (matrix.argmax(axis=1) == np.arange(3)).all()  # each photo finds its own prompt

    dino = scores.DinoEmbedder(dino_path, batch_size=4)
    model = transformers.AutoModel.from_pretrained(dino_path).eval()
    pixels = dino.images.processing(photos).transpose(0, 3, 1, 2)
    with torch.no_grad():
        cls = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0]
    want = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(dino.images(photos) @ want.T, want @ want.T, atol=1e-4)

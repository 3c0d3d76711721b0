"""CLIP-T / CLIP-I / DINO plumbing on tiny random transformers models saved in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

try:  # transformers 5.x: the PIL backend by name (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL/numpy one
    from transformers import CLIPImageProcessor

from core_jax import metrics
from core_jax.errors import InputError
from core_jax.text import load_tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, image_size=32, patch_size=8)
                ).save_pretrained(folder)
    return folder


def _images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# Cosines of unit vectors: |cos| <= 1, and a D-term fp32 dot product of unit vectors (D = 16
# for CLIP here, 32 for DINO) plus the normalisations that made them is off by at most ~(D + 4)
# units of roundoff 2^-24: <= 2.2e-6. The two sides of each comparison below run the same torch
# model on the same pixels and differ only in where that last arithmetic happens, so 5e-6 is
# above every such gap; a wrong embedding (unprojected, unnormalised, another token) moves the
# mean cosine by 1e-2 or more.
COSINE_ATOL = 5e-6


def test_preprocess_resizes_crops_and_normalises():
    image = np.full((1, 40, 60, 3), 255, np.uint8)
    out = metrics.preprocess(image, 32, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    # (1 - 0.5) / s for s = 0.25, 0.5, 1: exact in binary floating point.
    np.testing.assert_array_equal(out[0, :, 0, 0], [2.0, 1.0, 0.5])


def _chelsea_variants():
    """Chelsea the cat (451 x 300) and resized copies: landscape, portrait, square, smaller than
    the crop, and sides whose scaled length is not a whole number (451 * 224 / 300 = 336.77)."""
    cat = skimage_data.chelsea()
    yield "chelsea", cat
    for width, height in [(224, 224), (301, 200), (200, 301), (97, 64), (500, 223), (31, 31)]:
        resized = Image.fromarray(cat).resize((width, height), Image.BILINEAR)
        yield f"{width}x{height}", np.asarray(resized)


@pytest.mark.parametrize("size", [224, 32])
def test_preprocess_is_transformers_clip_image_processor(size):
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(metrics.CLIP_MEAN), image_std=list(metrics.CLIP_STD),
    )
    for name, image in _chelsea_variants():
        want = processor(images=[image], return_tensors="np")["pixel_values"]
        got = metrics.preprocess(image[None], size, metrics.CLIP_MEAN, metrics.CLIP_STD)
        assert got.shape == want.shape == (1, 3, size, size), name
        # Both resize the uint8 image with PIL's bicubic filter to the same size and crop the
        # same window, so the pixels are the same integers; only the scaling differs (x / 255
        # here, x * (1 / 255) there), 1 ulp of values in [0, 1], which the normalisation
        # (/ std ~ 0.27) turns into <= 2 ulp of values <= 2.2: <= 5e-7. One grey level off is
        # 1 / 255 / 0.27 = 1.5e-2.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)


def test_clip_t_is_the_reference_models_own_image_text_cosine(clip_folder):
    scorer = metrics.ClipScorer(clip_folder)
    images, prompts = _images(3), ["a dog in the snow", "a red cat", "a teapot, watercolor"]
    ours = metrics.clip_t(scorer, images, prompts)

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = torch.from_numpy(metrics.preprocess(images, 32, metrics.CLIP_MEAN, metrics.CLIP_STD))
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)  # embeddings normalised by CLIPModel itself
    reference = float((out.image_embeds * out.text_embeds).sum(-1).mean())
    assert ours == pytest.approx(reference, abs=COSINE_ATOL)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        metrics.clip_t(scorer, images, prompts[:2])


def test_dino_is_the_mean_cosine_of_the_reference_models_class_tokens(dino_folder):
    scorer = metrics.DinoScorer(dino_folder)
    a, b = _images(2, seed=1), _images(3, seed=2)
    ours = metrics.image_similarity(scorer, a, b)

    model = Dinov2Model.from_pretrained(dino_folder).eval()

    def class_tokens(images):
        pixels = metrics.preprocess(images, 32, metrics.IMAGENET_MEAN, metrics.IMAGENET_STD)
        with torch.no_grad():
            cls = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls, dim=-1)

    reference = float((class_tokens(a) @ class_tokens(b).T).mean())
    assert ours == pytest.approx(reference, abs=COSINE_ATOL)


def test_clip_i_is_the_mean_cosine_of_the_reference_models_image_embeds(clip_folder):
    scorer = metrics.ClipScorer(clip_folder)
    a, b = _images(2, seed=3), _images(3, size=40, seed=4)
    ours = metrics.image_similarity(scorer, a, b)

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = scorer.tokenizer(["a photo"], return_tensors="pt")

    def image_embeds(images):  # CLIPModel's own projected, normalised image embeddings
        pixels = metrics.preprocess(images, 32, metrics.CLIP_MEAN, metrics.CLIP_STD)
        with torch.no_grad():
            return model(pixel_values=torch.from_numpy(pixels), **tokens).image_embeds

    reference = float((image_embeds(a) @ image_embeds(b).T).mean())
    assert ours == pytest.approx(reference, abs=COSINE_ATOL)
    # Random models put all images close together; the pairs are still told apart.
    assert abs(reference) < 1 - 1e-3


def test_embeddings_in_batches_equal_one_pass(clip_folder, dino_folder, monkeypatch):
    clip, dino = metrics.ClipScorer(clip_folder), metrics.DinoScorer(dino_folder)
    images, prompts = _images(5, seed=5), ["a dog", "a red cat", "a teapot", "snow", "a hat"]
    whole = [clip.image_embeddings(images), clip.text_embeddings(prompts),
             dino.image_embeddings(images)]
    monkeypatch.setattr(metrics, "BATCH_SIZE", 2)  # slices of 2, 2 and 1
    sliced = [clip.image_embeddings(images), clip.text_embeddings(prompts),
              dino.image_embeddings(images)]
    for w, s in zip(whole, sliced, strict=True):
        assert w.shape == s.shape and w.shape[0] == 5
        # Unit vectors from the same model on smaller batches: torch may block the matrix
        # products differently, a few ulp of each O(1) activation; 2e-6 on unit-vector
        # entries is above that, a wrong order or a lost slice is O(0.1).
        np.testing.assert_allclose(s, w, rtol=0, atol=2e-6)


def test_features_of_either_transformers_major_version():
    tensor = torch.ones(2, 3)
    assert metrics._projected(tensor) is tensor  # transformers 4.x: the tensor itself

    class Output:  # transformers 5.x: an output object holding it
        pooler_output = tensor

    assert metrics._projected(Output()) is tensor


def test_a_folder_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="CLIP model folder .* has no config.json"):
        metrics.ClipScorer(tmp_path)
    with pytest.raises(InputError, match="DINO model folder"):
        metrics.DinoScorer(tmp_path)

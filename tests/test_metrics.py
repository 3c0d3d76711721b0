"""CLIP-T / CLIP-I / DINO plumbing on tiny random transformers models saved in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

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


def test_preprocess_resizes_crops_and_normalises():
    image = np.full((1, 40, 60, 3), 255, np.uint8)
    out = metrics.preprocess(image, 32, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


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
    assert ours == pytest.approx(reference, abs=1e-5)
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
    assert ours == pytest.approx(reference, abs=1e-5)
    assert metrics.image_similarity(scorer, a[:1], a[:1]) == pytest.approx(1.0, abs=1e-5)


def test_clip_i_is_one_for_the_same_photo(clip_folder):
    scorer = metrics.ClipScorer(clip_folder)
    photo = _images(1, seed=3)
    assert metrics.image_similarity(scorer, photo, photo) == pytest.approx(1.0, abs=1e-5)


def test_a_folder_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="CLIP model folder .* has no config.json"):
        metrics.ClipScorer(tmp_path)
    with pytest.raises(InputError, match="DINO model folder"):
        metrics.DinoScorer(tmp_path)

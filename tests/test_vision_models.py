"""Parity of our Flax CLIP vision tower, CLIP text projection and DINO / DINOv2 ViTs with
transformers' PyTorch models, built here from small configs with random weights, saved with
`save_pretrained` and read back through `core_jax.weights`.

Tolerance: 1e-4 absolute (the issue's bar) on outputs of magnitude O(1) (layer-normed hidden
states; projections of them). Both sides compute in fp32 and differ only in summation order:
a K-term dot product (K <= 128 here) rounds differently by about sqrt(K) 2^-24 ~ 7e-7 relative,
and a 2-layer encoder with its norms compounds a few of those: observed ~1e-6. A wrong weight
mapping (a transposed kernel, a missing layer scale, a wrong norm or position table) moves
outputs by 1e-2 or more.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch_helpers import jitter, nchw  # noqa: E402

from core_jax import weights  # noqa: E402
from core_jax.errors import InputError  # noqa: E402
from core_jax.models.vit import bicubic_matrix  # noqa: E402

ATOL = 1e-4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(TOWER, vocab_size=1000, max_position_embeddings=16, bos_token_id=998,
                         eos_token_id=999, pad_token_id=999),
        vision_config=dict(TOWER, image_size=32, patch_size=8),
        projection_dim=16,
    )
    jitter(transformers.CLIPModel(config)).save_pretrained(folder)
    return folder


def test_clip_vision_tower_matches_transformers(clip_folder):
    vision, params, _, _ = weights.load_clip(clip_folder)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    pixels = _pixels(3, 32)
    with torch.no_grad():
        # vision_model(...).pooler_output is the post-layernormed class token in transformers
        # 4.x and 5.x alike (unlike get_image_features, whose return type changed).
        ref = model.vision_model(pixel_values=nchw(pixels))
        ref_embeds = model.visual_projection(ref.pooler_output).numpy()
    out = vision.apply({"params": params}, pixels)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=ATOL,
                               rtol=0)
    np.testing.assert_allclose(out.image_embeds, ref_embeds, atol=ATOL, rtol=0)
    assert out.image_embeds.shape == (3, 16)


def test_clip_text_projection_matches_transformers(clip_folder):
    _, _, text, params = weights.load_clip(clip_folder)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    ids = np.array([[998, 5, 6, 999, 999, 999], [998, 7, 8, 9, 10, 999]])
    with torch.no_grad():
        ref = model.text_model(input_ids=torch.from_numpy(ids))
        ref_embeds = model.text_projection(ref.pooler_output).numpy()
    out, embeds = text.apply({"params": params}, ids)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=ATOL,
                               rtol=0)
    np.testing.assert_allclose(embeds, ref_embeds, atol=ATOL, rtol=0)
    # CLIPModel's own normalised embeddings: what CLIP-T compares, in either major version.
    with torch.no_grad():
        both = model(input_ids=torch.from_numpy(ids), pixel_values=nchw(_pixels(2, 32)))
    unit = np.asarray(embeds) / np.linalg.norm(embeds, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, both.text_embeds.numpy(), atol=ATOL, rtol=0)


def test_dino_vit_matches_transformers(tmp_path):
    torch.manual_seed(1)
    config = transformers.ViTConfig(**TOWER, image_size=32, patch_size=8)
    jitter(transformers.ViTModel(config), seed=1).save_pretrained(tmp_path)  # with a pooler
    module, params = weights.load_dino(tmp_path)
    model = transformers.ViTModel.from_pretrained(tmp_path).eval()
    pixels = _pixels(2, 32, seed=1)
    with torch.no_grad():
        ref = model(pixel_values=nchw(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(module.apply({"params": params}, pixels), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [56, 32, 72], ids=["stored_grid", "smaller", "larger"])
def test_dinov2_matches_transformers_with_position_interpolation(tmp_path, size):
    """Positions stored for 56 px (7 x 7 patches), run at 56, 32 (4 x 4: the 518 -> 224 case of
    real DINOv2 checkpoints) and 72 px (9 x 9)."""
    torch.manual_seed(2)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=56, patch_size=8, layerscale_value=0.5,
    )
    jitter(transformers.Dinov2Model(config), seed=2).save_pretrained(tmp_path)
    module, params = weights.load_dino(tmp_path)
    assert params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].shape == (32, 64)
    model = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    pixels = _pixels(2, size, seed=2)
    with torch.no_grad():
        ref = model(pixel_values=nchw(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(module.apply({"params": params}, pixels), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("n_in", "n_out"), [(37, 16), (7, 4), (7, 9), (5, 5), (3, 11)])
def test_bicubic_matrix_is_torch_interpolate(n_in, n_out):
    table = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, n_in, n_in)))
    want = torch.nn.functional.interpolate(table, size=(n_out, n_out), mode="bicubic",
                                           align_corners=False)[0, 0].numpy()
    m = bicubic_matrix(n_in, n_out)
    # float64 on both sides: only the order of the 16 products differs.
    np.testing.assert_allclose(m @ table[0, 0].numpy() @ m.T, want, atol=1e-12, rtol=0)


def test_folders_that_are_not_clip_or_dino_are_one_clear_error(tmp_path, clip_folder):
    with pytest.raises(InputError, match="CLIP model folder .* has no config.json"):
        weights.load_clip(tmp_path)
    with pytest.raises(InputError, match="is not a DINO model folder: .* model_type 'clip'"):
        weights.load_dino(clip_folder)
    with pytest.raises(InputError, match="not a CLIP model folder"):
        (tmp_path / "config.json").write_text('{"model_type": "vit"}')
        weights.load_clip(tmp_path)


def test_literal_names_first_then_the_legacy_vae_names():
    """ViT's `attention.query` stays literal; a pre-0.14 VAE's `query` still maps to `to_q`."""
    shape = jax.ShapeDtypeStruct((4, 4), np.float32)
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    vit = weights.convert_state_dict({"attention.query.weight": weight},
                                     {"attention": {"query": {"kernel": shape}}}, "vit")
    vae = weights.convert_state_dict({"attention.query.weight": weight},
                                     {"attention": {"to_q": {"kernel": shape}}}, "vae")
    np.testing.assert_array_equal(vit["attention"]["query"]["kernel"], weight.T)
    np.testing.assert_array_equal(vae["attention"]["to_q"]["kernel"], weight.T)

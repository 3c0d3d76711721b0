"""Exports other tools read: diffusers textual inversion, A1111/ComfyUI embeddings, U-Net folders.

The interop checks load our files with diffusers itself (tiny random-weight pipeline, offline
CLIP vocabulary) and compare against our Flax models to 5e-5 of the output's largest magnitude
(outputs are O(1): ~1e-4 absolute). Both sides are fp32 and differ only in summation order: a
K-term reduction (K <= 576) rounds differently by ~sqrt(K) x 2^-24 = 1.4e-6 relative, and the
U-Net's ~40 such layers in series add up to ~1e-5 at worst (observed ~1e-6, test_models.py has
the same argument). Wrong files or a wrong mapping move outputs by 1e-2 or more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from core_jax import weights  # noqa: E402
from core_jax.errors import InputError  # noqa: E402
from core_jax.export import (  # noqa: E402
    export_unet,
    load_learned_embeds,
    save_a1111_embedding,
    save_learned_embeds,
)
from core_jax.models.presets import get_preset  # noqa: E402
from core_jax.models.unet import UNet2DConditionModel  # noqa: E402
from core_jax.text import (  # noqa: E402
    add_placeholder_tokens,
    caption_ids,
    clip_tokenizer_dir,
    load_tokenizer,
    placeholder_slots,
    placeholder_string,
    placeholder_tokens,
)

REL_TOL = 5e-5


def _assert_close(got, want) -> None:
    """|got - want| <= REL_TOL * max|want| elementwise (see the module docstring)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=REL_TOL * np.abs(want).max())
PROMPT = "a photo of a {}"


def _vectors(num: int, dim: int, seed: int = 0) -> np.ndarray:
    return (0.5 * np.random.default_rng(seed).standard_normal((num, dim))).astype(np.float32)


def _tiny_pipeline(seed: int) -> diffusers.StableDiffusionPipeline:
    preset = get_preset("tiny")
    torch.manual_seed(seed)
    text_config = transformers.CLIPTextConfig.from_dict(preset.text.to_diffusers())
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_config(preset.vae.to_diffusers()),
        text_encoder=transformers.CLIPTextModel(text_config).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir()),
        unet=diffusers.UNet2DConditionModel.from_config(preset.unet.to_diffusers()),
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _random_params(shapes: weights.Params, seed: int) -> weights.Params:
    """Random values for every leaf, scaled like an init; cheaper than compiling `module.init`.

    Norm scales and biases are random too, so a mis-mapped weight of any kind cannot hide.
    """
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1 + 0.05 * noise if name == "scale" else 0.05 * noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize(("num_vectors", "as_folder"), [(1, False), (3, True)])
def test_learned_embeds_load_in_diffusers_and_encode_like_our_encoder(
    tmp_path, num_vectors, as_folder
):
    pipe = _tiny_pipeline(seed=num_vectors)
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")  # before the table grows
    dim = pipe.text_encoder.config.hidden_size
    vectors = _vectors(num_vectors, dim, seed=num_vectors)
    if as_folder:  # a folder holding learned_embeds.safetensors, as on the Hub
        target = tmp_path / "concept"
        target.mkdir()
    else:
        target = tmp_path / "concept.safetensors"
    save_learned_embeds(target, "<s*>", vectors)

    pipe.load_textual_inversion(str(target))

    names = placeholder_tokens("<s*>", num_vectors)
    new_ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert new_ids == list(range(49408, 49408 + num_vectors))
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[new_ids], vectors)

    # Same prompt through diffusers (which expands "<s*>" to all V tokens) and through ours.
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPT.format("<s*>"), "cpu", 1, False)
    tokenizer = load_tokenizer()
    ours_ids = add_placeholder_tokens(tokenizer, "<s*>", num_vectors)
    ids = caption_ids(tokenizer, placeholder_string("<s*>", num_vectors), PROMPT)[None]
    diffusers_ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(PROMPT.format("<s*>"), pipe.tokenizer),
        padding="max_length", max_length=pipe.tokenizer.model_max_length,
    ).input_ids
    assert ours_ids == new_ids and ids[0].tolist() == diffusers_ids
    mask, slot = placeholder_slots(ids, ours_ids)
    assert mask.sum() == num_vectors
    module, params = weights.load_text_encoder(tmp_path)
    out = module.apply({"params": params}, ids, inject_embeds=vectors[slot], inject_mask=mask)
    _assert_close(out.last_hidden_state, expected.numpy())

    # diffusers also takes the A1111 file, given the token (its file name is the token there).
    a1111 = save_a1111_embedding(tmp_path, "cat-toy", vectors, step=10)
    pipe.load_textual_inversion(str(a1111), token="<cat-toy>")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    rows = pipe.tokenizer.convert_tokens_to_ids(placeholder_tokens("<cat-toy>", num_vectors))
    np.testing.assert_array_equal(table[rows], vectors)


def test_exported_unet_loads_in_diffusers_with_the_same_outputs(tmp_path):
    config = get_preset("tiny").unet
    module = UNet2DConditionModel(config)
    size, dim = config.sample_size, config.cross_attention_dim
    params = _random_params(weights.unet_shapes(module), seed=1)
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, dim)).astype(np.float32)
    timesteps = np.array([7, 912])
    ours = np.asarray(jax.jit(module.apply)({"params": params}, latents, timesteps, context))

    export_unet(tmp_path / "out", module, jax.tree.map(jnp.zeros_like, params))
    unet_dir = export_unet(tmp_path / "out", module, params)  # replaces the first export
    assert unet_dir == tmp_path / "out" / "unet"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["unet"]
    assert sorted(p.name for p in unet_dir.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors",
    ]
    ref = diffusers.UNet2DConditionModel.from_pretrained(unet_dir).eval()
    with torch.no_grad():
        sample = ref(
            torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
            torch.from_numpy(context),
        ).sample
    _assert_close(ours, sample.permute(0, 2, 3, 1).numpy())


def test_a1111_embedding_file(tmp_path):
    vectors = _vectors(4, 32)
    path = save_a1111_embedding(tmp_path, "my-concept", vectors, step=500)
    assert path == tmp_path / "my-concept.safetensors"
    state = safetensors.numpy.load_file(str(path))
    assert list(state) == ["emb_params"]  # the webui rejects files with a second tensor
    assert state["emb_params"].dtype == np.float32
    np.testing.assert_array_equal(state["emb_params"], vectors)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"name": "my-concept", "step": "500"}
    explicit = save_a1111_embedding(tmp_path / "sub" / "other.safetensors", "x", vectors)
    assert "step" not in safetensors.safe_open(str(explicit), framework="numpy").metadata()
    with pytest.raises(ValueError, match="path separators"):
        save_a1111_embedding(tmp_path, "a/b", vectors)


@pytest.mark.parametrize("fail_at", ["serialize", "rename"])
@pytest.mark.parametrize("writer", ["learned_embeds", "a1111"])
def test_failed_embedding_write_leaves_the_destination_as_it_was(
    tmp_path, monkeypatch, fail_at, writer
):
    def save(path, vectors):
        if writer == "learned_embeds":
            return save_learned_embeds(path, "<s*>", vectors)
        return save_a1111_embedding(path, "concept", vectors)

    fresh, existing = tmp_path / "fresh.safetensors", tmp_path / "existing.safetensors"
    save(existing, _vectors(2, 8, seed=1))
    before = existing.read_bytes()

    def fail(*args, **kwargs):
        # The temporary file exists by now: the failure must remove it.
        assert any(p.name.startswith(".") for p in tmp_path.iterdir())
        raise OSError("disk full")

    if fail_at == "serialize":
        monkeypatch.setattr(safetensors.numpy, "save", fail)
    else:
        monkeypatch.setattr("core_jax.export.os.replace", fail)
    for destination in (fresh, existing):
        with pytest.raises(OSError, match="disk full"):
            save(destination, _vectors(2, 8, seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]
    assert existing.read_bytes() == before


def test_failed_unet_export_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    config = get_preset("tiny").unet
    module = UNet2DConditionModel(config)
    params = jax.tree.map(jnp.zeros_like, weights.unet_shapes(module))
    export_unet(tmp_path / "old", module, params)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old" / "unet").iterdir()}

    def fail(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save", fail)
    for folder in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(OSError, match="disk full"):
            export_unet(folder, module, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]
    assert list((tmp_path / "new").iterdir()) == []
    assert list((tmp_path / "old").iterdir()) == [tmp_path / "old" / "unet"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old" / "unet").iterdir()} == before


def test_learned_embeds_round_trip(tmp_path):
    for num_vectors in (1, 3):
        vectors = _vectors(num_vectors, 16, seed=num_vectors)
        path = save_learned_embeds(tmp_path, f"<c{num_vectors}>", vectors)
        assert path == tmp_path / "learned_embeds.safetensors"
        name, loaded = load_learned_embeds(tmp_path)
        assert name == f"<c{num_vectors}>"
        np.testing.assert_array_equal(loaded, vectors)
    # bf16/fp16 training state is written as float32.
    path = save_learned_embeds(tmp_path / "h.safetensors", "<h>", vectors.astype(np.float16))
    assert load_learned_embeds(path)[1].dtype == np.float32
    # Single-vector files of older tools store [D].
    safetensors.numpy.save_file({"<old>": vectors[0]}, str(tmp_path / "old.safetensors"))
    assert load_learned_embeds(tmp_path / "old.safetensors")[1].shape == (1, 16)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        save_learned_embeds(tmp_path, "<s*>", np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        save_learned_embeds(tmp_path, "<s*>", np.full((1, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="whitespace"):
        save_learned_embeds(tmp_path, "a b", np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_learned_embeds(tmp_path / "x.bin", "<s*>", np.zeros((1, 8), np.float32))
    (tmp_path / "learned_embeds.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="pickled"):
        load_learned_embeds(tmp_path / "learned_embeds.bin")
    two = tmp_path / "two.safetensors"
    safetensors.numpy.save_file({"a": np.zeros((1, 4)), "b": np.zeros((1, 4))}, str(two))
    with pytest.raises(InputError, match="exactly one"):
        load_learned_embeds(two)
    with pytest.raises(InputError, match="no embedding file"):
        load_learned_embeds(tmp_path / "missing.safetensors")

"""SDXL sampling and SDXL embedding files against diffusers' StableDiffusionXLPipeline, on a tiny
random-weight SDXL folder saved in the test (tests/test_sdxl_models.py builds it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402
from test_sdxl_models import _tiny_sdxl_pipeline, assert_max_abs  # noqa: E402
from torch_helpers import nchw, nhwc  # noqa: E402

from core_jax import export  # noqa: E402
from core_jax.config import base_config, migrate  # noqa: E402
from core_jax.errors import InputError  # noqa: E402
from core_jax.models.clip_text import CLIPTextConfig  # noqa: E402
from core_jax.sample import (  # noqa: E402
    _prompt_arrays,
    generate,
    generate_latents,
    load_sdxl_pipeline,
)
from core_jax.text import encode_sdxl_with_learned, second_encoder_ids, tokenize  # noqa: E402
from core_jax.train import setup as run_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = _tiny_sdxl_pipeline()
    # Our DDIM is SD's (tests/test_diffusion.py checks it step by step against this config).
    pipe.scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    pipe.save_pretrained(folder)
    return folder


def test_sdxl_sampling_equals_diffusers_pipeline(sdxl_folder):
    """Both encoders' penultimate states, the pooled projection, the add-time ids, zeros for the
    unconditional half and guidance: the same final latents as diffusers from the same noise."""
    ours = load_sdxl_pipeline(sdxl_folder, num_vectors=0)
    prompts, steps, scale, seed = ["a photo of a dog in the jungle", "a red cube"], 4, 5.0, 3
    latents = generate_latents(ours, prompts, num_images_per_prompt=1, steps=steps,
                               guidance_scale=scale, seed=seed)
    k_init, _ = jax.random.split(jax.random.key(seed))
    x_T = np.asarray(jax.random.normal(k_init, latents.shape))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    assert pipe.config.force_zeros_for_empty_prompt
    with torch.no_grad():
        expected = pipe(prompts, num_inference_steps=steps, guidance_scale=scale,
                        latents=nchw(x_T), output_type="latent").images
    assert_max_abs(latents, nhwc(expected))
    images = generate(ours, prompts[:1], steps=2, seed=seed)  # and the decode runs
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_sdxl_embedding_file_loads_into_both_encoders_of_diffusers(sdxl_folder, tmp_path):
    """Learned vectors [V, D1 + D2] exported as clip_l / clip_g: diffusers' loader puts them into
    both text encoders, and the SDXL context of a prompt with S* equals ours. The pooled
    embedding is read where each side says: ours at the first end-of-text token, diffusers'
    (transformers' pooling for SDXL's legacy config, eos_token_id 2) at argmax(ids), which an
    added token's id wins."""
    ours = load_sdxl_pipeline(sdxl_folder, num_vectors=2)
    assert ours.embed_dim == 32 + 48
    learned = np.random.default_rng(0).normal(size=(2, 80)).astype(np.float32)
    path = export.save_sdxl_embedding(tmp_path, "my_concept", learned, width_1=32)
    assert path.name == "my_concept.safetensors"
    np.testing.assert_array_equal(export.load_sdxl_embedding(path), learned)

    state = safetensors.torch.load_file(path)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.load_textual_inversion(state["clip_l"], token="<s*>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<s*>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompts = ["a photo of a <s*> in the snow"]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu",
                                                   do_classifier_free_guidance=False)
    ids, mask, slot, vectors = _prompt_arrays(ours, prompts, learned)
    ids_2 = tokenize(ours.tokenizer_2, ["a photo of a <s*> <s*>_1 in the snow"])
    # diffusers writes "<s*>" out as "<s*> <s*>_1" too (its maybe_convert_prompt).
    written_out = pipe.maybe_convert_prompt(prompts[0], pipe.tokenizer)
    np.testing.assert_array_equal(ids[0], tokenize(ours.tokenizer, [written_out])[0])
    # Tokenizer 2's ids are tokenizer 1's with its own padding (what the training step uses).
    np.testing.assert_array_equal(
        second_encoder_ids(ids, ours.tokenizer.eos_token_id, ours.tokenizer_2.pad_token_id), ids_2)
    got, got_pooled = encode_sdxl_with_learned(ours.text_encoder, ours.text_encoder_2,
                                               ours.params, ids, ids_2, vectors, (mask, slot))
    assert_max_abs(got, context.numpy())
    with torch.no_grad():
        out = pipe.text_encoder_2(torch.as_tensor(np.asarray(ids_2)))

    def projected_at(position: int) -> np.ndarray:
        with torch.no_grad():
            return pipe.text_encoder_2.text_projection(out.last_hidden_state[:, position]).numpy()

    first_eos = int(np.argmax(np.asarray(ids_2[0]) == ours.tokenizer_2.eos_token_id))
    highest_id = int(np.argmax(np.asarray(ids_2[0])))
    assert ids_2[0][highest_id] == ours.placeholder_ids[-1] and highest_id < first_eos
    assert_max_abs(got_pooled, projected_at(first_eos))
    assert_max_abs(pooled.numpy(), projected_at(highest_id))
    # pooling="as_config" reads the folder's config as transformers does: diffusers' pooled too.
    as_diffusers = load_sdxl_pipeline(sdxl_folder, num_vectors=2, pooling="as_config")
    assert as_diffusers.text_encoder_2.config.pooling == "argmax_ids"
    got, got_pooled = encode_sdxl_with_learned(
        as_diffusers.text_encoder, as_diffusers.text_encoder_2, as_diffusers.params, ids, ids_2,
        vectors, (mask, slot))
    assert_max_abs(got, context.numpy())
    assert_max_abs(got_pooled, pooled.numpy())
    with pytest.raises(ValueError, match="width_1"):
        export.save_sdxl_embedding(tmp_path, "bad", learned, width_1=80)


def test_pooling_follows_a_legacy_config_only_when_asked_and_saves_back_as_it_was_read():
    legacy = {**CLIPTextConfig().to_diffusers(), "eos_token_id": 2}
    assert CLIPTextConfig.from_diffusers(legacy).pooling == "end_of_text"
    as_config = CLIPTextConfig.from_diffusers(legacy, "as_config")
    assert as_config.pooling == "argmax_ids" and as_config.eos_token_id == 49407
    assert as_config.to_diffusers()["eos_token_id"] == 2 and "pooling" not in legacy
    current = CLIPTextConfig().to_diffusers()
    assert CLIPTextConfig.from_diffusers(current, "as_config").pooling == "end_of_text"
    with pytest.raises(ValueError, match="pooling"):
        CLIPTextConfig.from_diffusers(current, "last")
    config = base_config()
    config.concept.super_category = "dog"
    config.model.pooling = "last"
    with pytest.raises(InputError, match="model.pooling is 'last'; choose one of end_of_text, "
                                         "as_config"):
        run_setup.check_config(config)
    assert migrate({"version": 2})["model"]["pooling"] == "end_of_text"  # runs saved before it


@pytest.mark.slow
def test_a_run_trained_from_an_sdxl_folder_exports_what_diffusers_loads(sdxl_folder, tmp_path):
    """`core-jax train` from a saved SDXL folder with model.pooling="as_config": the run's own
    a1111 file, loaded by diffusers into both encoders of that folder's pipeline, gives the
    context and the pooled embedding the run trained with (ours from its learned vectors)."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "core_jax", "train", "--config",
           str(ROOT / "configs/core_sdxl.py"), "--workdir", str(workdir),
           f"--config.model.path={sdxl_folder}", "--config.model.pooling=as_config",
           "--config.data.resolution=64", "--config.data.num_views=2",
           "--config.stage1.steps=2", "--config.stage1.batch_size=2",
           "--config.stage1.rescale_start=1", "--config.stage1.rescale_end=2",
           "--config.stage2.steps=0", "--config.concept.images=builtin:chelsea",
           "--config.concept.super_category=cat", "--config.sample.at_end=False"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    learned = safetensors.numpy.load_file(workdir / "learned_embeds.safetensors")["<s*>"]
    ours = load_sdxl_pipeline(sdxl_folder, num_vectors=1, pooling="as_config")
    prompts = ["a photo of a <s*> on the beach"]
    ids, mask, slot, vectors = _prompt_arrays(ours, prompts, learned)
    ids_2 = second_encoder_ids(ids, ours.tokenizer.eos_token_id, ours.tokenizer_2.pad_token_id)
    want, want_pooled = encode_sdxl_with_learned(ours.text_encoder, ours.text_encoder_2,
                                                 ours.params, ids, ids_2, vectors, (mask, slot))
    state = safetensors.torch.load_file(workdir / "a1111" / "concept.safetensors")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.load_textual_inversion(state["clip_l"], token="<s*>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<s*>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu",
                                                   do_classifier_free_guidance=False)
    assert_max_abs(want, context.numpy())
    assert_max_abs(want_pooled, pooled.numpy())


@pytest.mark.slow
def test_sdxl_lora_file_loads_in_diffusers_and_adapts_like_ours(sdxl_folder, tmp_path):
    """LoRA on the SDXL U-Net (the lora method's adapters on every attention projection of the
    tiny SDXL U-Net): both files `export_concept` writes (peft names, kohya names) through
    diffusers' `load_lora_weights` into a StableDiffusionXLPipeline adapt its U-Net as ours,
    with the added conditioning (pooled text, add-time ids). Tolerance: tests/test_lora.py's."""
    from test_lora import _assert_close, _trained_adapters

    from core_jax.methods.lora import ATTENTION, adapted_call

    ours = load_sdxl_pipeline(sdxl_folder, num_vectors=0)
    adapters = _trained_adapters(ours.unet_params, 4, 2.0, ATTENTION, seed=3)
    rng = np.random.default_rng(3)
    size, cfg = ours.unet.config.sample_size, ours.unet.config
    latents = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((2, cfg.pooled_text_dim)).astype(np.float32),
             "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]], np.float32)}
    timesteps = np.array([3, 871])

    def run(params):
        return ours.unet.apply({"params": params}, latents, timesteps, context, **added)

    adapted = np.asarray(adapted_call(run, ours.unet_params, adapters))

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)

    def theirs() -> np.ndarray:
        with torch.no_grad():
            return nhwc(pipe.unet(
                nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample)

    base = theirs()
    _assert_close(np.asarray(run(ours.unet_params)), base)
    assert np.abs(adapted - base).max() > 1e-2 * np.abs(base).max()
    written = export.export_concept(tmp_path / "run", name="teapot", placeholder="<s*>",
                                    lora=jax.device_get(adapters))
    for kind, source in (("peft", tmp_path / "run"), ("kohya", written["lora_kohya"])):
        pipe.load_lora_weights(str(source), adapter_name=kind)
        _assert_close(theirs(), adapted)
        pipe.unload_lora_weights()

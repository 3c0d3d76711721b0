"""Parity of our Flax models with diffusers/transformers, built here with random weights.

Each reference is saved with `save_pretrained` and loaded through `core_jax.weights`, so these
tests cover the models, the weight mapping and the folder reader together.

Tolerance: 5e-5 of the output's largest magnitude (outputs are O(1): ~1e-4 absolute). Both sides
compute in fp32 and differ only in the order in which XLA and torch sum: a reduction of K terms
(K up to 3 x 3 x 64 = 576 in the convolutions) rounds differently by ~sqrt(K) U = 1.4e-6 relative
(U = 2^-24), and ~40 such layers in series add up to ~1e-5 in the worst plausible case; observed
~1e-6. A wrong weight mapping, activation or norm moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from torch_helpers import ProbabilityRecorder, jitter, nchw, nhwc  # noqa: E402

from core_jax import weights  # noqa: E402
from core_jax.errors import InputError  # noqa: E402
from core_jax.models.attention import CHUNK  # noqa: E402
from core_jax.models.layers import Attention  # noqa: E402
from core_jax.models.presets import get_preset  # noqa: E402
from core_jax.models.unet import cross_attention_stats  # noqa: E402

REL_TOL = 5e-5


def assert_close(got, want, rel_tol: float = REL_TOL) -> None:
    """|got - want| <= rel_tol * max|want| elementwise (see the module docstring)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel_tol * np.abs(want).max())

SD1_UNET = dict(
    sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
    cross_attention_dim=24, norm_num_groups=16, layers_per_block=2,
)
SD2_UNET = dict(
    SD1_UNET, attention_head_dim=(2, 4, 4, 8), use_linear_projection=True, upcast_attention=True,
)


def _unet_case(tmp_path, config: dict, seed: int):
    torch.manual_seed(seed)
    ref = jitter(diffusers.UNet2DConditionModel(**config), seed)
    ref.save_pretrained(tmp_path / "unet")
    module, params = weights.load_unet(tmp_path)
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    latents = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    timesteps = np.array([3, 871])
    return ref, module, params, latents, context, timesteps


@pytest.mark.parametrize("config", [SD1_UNET, SD2_UNET], ids=["sd1", "sd2"])
def test_unet_matches_diffusers_with_attention_stats(tmp_path, config):
    ref, module, params, latents, context, timesteps = _unet_case(tmp_path, config, seed=1)
    log: list = []
    processors = {
        name: ProbabilityRecorder(log) if "attn2" in name else proc
        for name, proc in ref.attn_processors.items()
    }
    ref.set_attn_processor(processors)
    with torch.no_grad():
        expected = nhwc(
            ref(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
        )
    out, state = module.apply(
        {"params": params}, latents, timesteps, context, mutable=["attn_stats"]
    )
    assert_close(out, expected)
    # Not collecting the statistics runs the same operations (apply outside jit runs them one
    # by one; `sow` only stores): bitwise the same output.
    np.testing.assert_array_equal(module.apply({"params": params}, latents, timesteps, context),
                                  out)
    means = np.asarray(cross_attention_stats(state, "mean"), np.float64)
    variances = np.asarray(cross_attention_stats(state, "var"), np.float64)
    assert means.shape == (16, 2, 7) == (module.config.num_cross_attention_layers, 2, 7)
    ref_means = np.stack([m.numpy() for m, _ in log]).astype(np.float64)
    ref_variances = np.stack([v.numpy() for _, v in log]).astype(np.float64)
    # The probabilities come from hidden states that agree to ~1e-6 relative (the tolerance
    # argument above, for the layers before each cross-attention); a softmax turns an error e
    # in its logits (O(1) here) into a relative error ~e in each probability, so the means
    # agree to ~1e-6 relative: rtol 1e-5.
    np.testing.assert_allclose(means, ref_means, rtol=1e-5, atol=0)
    # var = E[p^2] - E[p]^2 cancels: its error is relative to E[p^2], not to var.
    second_moment = ref_variances + ref_means**2
    assert np.all(np.abs(variances - ref_variances) <= 1e-5 * second_moment), (
        np.abs(variances - ref_variances).max()
    )
    # Probabilities over 7 keys sum to one for every query, so per-token means sum to one:
    # a softmax's sum is 1 to a few U, the mean over queries and the 7-term sum add ~10 U
    # (6e-7); 2e-6 leaves 3x.
    np.testing.assert_allclose(means.sum(-1), 1.0, rtol=0, atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="dot_product_attention takes the chunked path on CPU only")
def test_stats_recording_attention_equals_the_chunked_path():
    """A cross-attention layer that records statistics computes them blockwise with its output
    (`blockwise_attention_with_stats`, a loop over query blocks); one that does not goes
    through `dot_product_attention`, which on CPU with more than CHUNK queries is the
    flash-style chunked loop. Same weights and inputs through the two paths: the same output,
    and the recorded statistics are those of the probabilities written out here in float64."""
    heads, head_dim, width, n_q, n_k = 4, 8, 32, 2 * CHUNK + 22, 7  # 3 chunks, the last padded
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, n_q, width)).astype(np.float32)
    context = rng.standard_normal((2, n_k, 24)).astype(np.float32)
    recording = Attention(heads, head_dim, width, record_stats=True)
    plain = Attention(heads, head_dim, width, record_stats=False)
    params = recording.init(jax.random.key(0), x, context)["params"]

    def with_stats(x, c):
        return recording.apply({"params": params}, x, c, mutable=["attn_stats"])

    def without_stats(x, c):
        return plain.apply({"params": params}, x, c)

    # Two different programs, both looping over query chunks.
    plain_program = str(jax.make_jaxpr(without_stats)(x, context))
    recording_program = str(jax.make_jaxpr(with_stats)(x, context))
    assert "scan" in plain_program and "scan" in recording_program
    assert plain_program != recording_program
    out, state = jax.jit(with_stats)(x, context)
    chunked = jax.jit(without_stats)(x, context)
    # The chunked loop rescales running sums by exp(m_old - m_new) per chunk (a few extra
    # roundings per chunk, 3 chunks) and sums 7 weighted values in another order; to_out then
    # sums 32 products. Together ~20 U = 1.2e-6 of the output scale; 1e-5 leaves ~8x.
    assert_close(chunked, out, rel_tol=1e-5)

    # The statistics against float64: fp32 q and k (32-term sums) give logits off by ~1e-6,
    # i.e. probabilities off by ~1e-6 relative; rtol 1e-5 for means, and for variances 1e-5
    # of E[p^2] (they are a difference, see test_unet_matches_diffusers_with_attention_stats).
    w_q = np.asarray(params["to_q"]["kernel"], np.float64)
    w_k = np.asarray(params["to_k"]["kernel"], np.float64)
    q = (x @ w_q).reshape(2, n_q, heads, head_dim)
    k = (context @ w_k).reshape(2, n_k, heads, head_dim)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref_mean = probs.mean(axis=(1, 2))
    ref_var = (probs**2).mean(axis=(1, 2)) - ref_mean**2
    stats = state["attn_stats"]
    np.testing.assert_allclose(stats["mean"][0], ref_mean, rtol=1e-5, atol=0)
    err = np.abs(np.asarray(stats["var"][0], np.float64) - ref_var)
    assert np.all(err <= 1e-5 * (probs**2).mean(axis=(1, 2))), err.max()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("prefix", [True, False], ids=["text_model_prefix", "no_prefix"])
def test_text_encoder_matches_transformers(tmp_path, act, prefix):
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, hidden_act=act, bos_token_id=998, eos_token_id=999,
        pad_token_id=999, max_position_embeddings=16,
    )
    torch.manual_seed(3)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    if not prefix:  # some exporters drop `text_model.`
        from safetensors.torch import load_file, save_file

        path = tmp_path / "text_encoder" / "model.safetensors"
        state = {k.removeprefix("text_model."): v for k, v in load_file(path).items()}
        save_file(state, path)
    module, params = weights.load_text_encoder(tmp_path)
    ids = np.array([[998, 5, 6, 999, 999, 999], [998, 7, 8, 9, 10, 999]])
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids))
    out = module.apply({"params": params}, ids)
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)


def test_injected_vectors_equal_an_extended_vocabulary(tmp_path):
    """Learned vectors outside the table == the same vectors appended to the table in torch."""
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, bos_token_id=998, eos_token_id=999, pad_token_id=999,
    )
    torch.manual_seed(4)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = weights.load_text_encoder(tmp_path)
    learned = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    ids = np.array([[998, 5, 1000, 1001, 6, 999, 999], [998, 1000, 1001, 999, 999, 999, 999]])
    ref.resize_token_embeddings(1002)
    with torch.no_grad():
        ref.get_input_embeddings().weight[1000:] = torch.from_numpy(learned)
        expected = ref(torch.from_numpy(ids))
    mask = ids >= 1000
    inject = np.zeros(ids.shape + (32,), np.float32)
    inject[mask] = learned[ids[mask] - 1000]
    out = module.apply({"params": params}, ids, inject_embeds=inject, inject_mask=mask)
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)
    # The table is untouched and gradients reach the injected vectors.
    assert params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (1000, 32)

    def total(inj):
        out = module.apply({"params": params}, ids, inject_embeds=inj, inject_mask=mask)
        return out.last_hidden_state.sum()

    grad = jax.grad(total)(jnp.asarray(inject))
    assert np.all(np.asarray(grad)[~mask] == 0) and np.any(np.asarray(grad)[mask] != 0)


def test_pooled_output_uses_the_first_end_of_text_with_sd2_padding(tmp_path):
    """SD 2.x pads with '!' (id 0): the first end-of-text is still the pooled position."""
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, bos_token_id=998, eos_token_id=999, pad_token_id=0,
    )
    torch.manual_seed(5)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = weights.load_text_encoder(tmp_path)
    ids = np.array([[998, 5, 6, 999, 0, 0, 0]])
    out = module.apply({"params": params}, ids)
    # The pooled row is a copy of one row: exactly equal.
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[:, 3])


def test_vae_matches_diffusers(tmp_path):
    torch.manual_seed(6)
    ref = jitter(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
        layers_per_block=1,
    ), 6)
    ref.save_pretrained(tmp_path / "vae")
    module, params = weights.load_vae(tmp_path)
    images = np.random.default_rng(6).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(nchw(images)).latent_dist
        decoded = nhwc(ref.decode(dist.mean).sample)
    mean, logvar = module.apply({"params": params}, images, method=module.encode)
    assert_close(mean, nhwc(dist.mean))
    assert_close(logvar, nhwc(dist.logvar))
    out = module.apply({"params": params}, mean, method=module.decode)
    assert_close(out, decoded)


def test_export_round_trip_loads_in_diffusers(tmp_path):
    """load -> save_unet -> diffusers from_pretrained gives the same function; bytes round-trip."""
    ref, module, params, latents, context, timesteps = _unet_case(tmp_path, SD2_UNET, seed=7)
    weights.save_unet(tmp_path / "export" / "unet", module, params)
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet").eval()
    with torch.no_grad():
        args = (nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context))
        np.testing.assert_array_equal(again(*args).sample.numpy(), ref(*args).sample.numpy())
    _, reloaded = weights.load_unet(tmp_path / "export")
    jax.tree.map(np.testing.assert_array_equal, params, reloaded)


def test_presets_build_in_diffusers_and_load(tmp_path):
    """Our preset configs are valid diffusers configs, and the tiny one loads back."""
    preset = get_preset("tiny")
    ref = diffusers.UNet2DConditionModel.from_config(preset.unet.to_diffusers())
    ref.save_pretrained(tmp_path / "unet")
    module, _ = weights.load_unet(tmp_path)
    assert module.config == preset.unet
    vae = diffusers.AutoencoderKL.from_config(preset.vae.to_diffusers())
    vae.save_pretrained(tmp_path / "vae")
    assert weights.load_vae(tmp_path)[0].config == preset.vae


def test_sharded_checkpoints_load(tmp_path):
    torch.manual_seed(8)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, eos_token_id=499,
    ))
    ref.save_pretrained(tmp_path / "text_encoder", max_shard_size="20KB")
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    _, params = weights.load_text_encoder(tmp_path)
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(table, ref.get_input_embeddings().weight.detach().numpy())


def test_bad_folders_give_clear_errors(tmp_path):
    torch.manual_seed(9)
    ref = diffusers.UNet2DConditionModel(**SD1_UNET)
    ref.save_pretrained(tmp_path / "unet")
    with pytest.raises(InputError, match="does not exist"):
        weights.load_unet(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no text_encoder/config.json"):
        weights.load_text_encoder(tmp_path)
    # Wrong shapes: the config says wider channels than the weights have.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "unet", bad / "unet")
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="shape"):
        weights.load_unet(bad)
    # Only pickled weights: refused unless asked for.
    pickled = tmp_path / "pickled"
    shutil.copytree(tmp_path / "unet", pickled / "unet")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(ref.state_dict(), pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="pickled"):
        weights.load_unet(pickled)
    _, from_pickle = weights.load_unet(pickled, allow_pickle=True)
    _, from_safetensors = weights.load_unet(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, from_pickle, from_safetensors)
    # Unsupported architecture options are named.
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="addition_embed_type"):
        weights.load_unet(bad)


@pytest.mark.slow
def test_bench_small_unet_parity(tmp_path):
    """DESIGN.md's bench-small U-Net (64/128/256/256, 16 cross-attention layers, 32x32)."""
    config = get_preset("bench_small").unet.to_diffusers()
    torch.manual_seed(10)
    ref = jitter(diffusers.UNet2DConditionModel.from_config(config), 10)
    ref.save_pretrained(tmp_path / "unet")
    module, params = weights.load_unet(tmp_path)
    rng = np.random.default_rng(10)
    latents = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, 256)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(latents), torch.tensor([500]), torch.from_numpy(context)).sample)
    out = module.apply({"params": params}, latents, np.array([500]), context)
    assert_close(out, expected)

"""benchmarks/torch_reference.py: the PyTorch CoRe step that the JAX step is checked against.

Tiny preset, two placeholder vectors, float64 so that finite differences are exact enough to
check the gradient of every term.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from core_jax import text as ctext  # noqa: E402
from core_jax.bench.reference import load_torch_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_VECTORS = 2


ref = load_torch_reference()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: threads only add synchronisation, and stall badly on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    unet, text_encoder, tokenizer, placeholder_ids, super_id = ref.build_models(
        "tiny", num_vectors=NUM_VECTORS
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Random init zeroes some layers (e.g. conv_out); perturb so every weight matters.
        for p in [*unet.parameters(), *text_encoder.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    unet.double().eval().requires_grad_(False)
    text_encoder.double().eval().requires_grad_(False)

    concept = ctext.placeholder_string("<s*>", NUM_VECTORS)
    prompts = ctext.regularization_prompts(tokenizer, ["a {} in the snow"], concept, "cat")
    table = text_encoder.get_input_embeddings().weight.detach()
    scheduler = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    shape = (2, 4, 8, 8)
    inputs = {
        "latents": torch.randn(shape, generator=gen, dtype=torch.float64),
        "noise": torch.randn(shape, generator=gen, dtype=torch.float64),
        "timesteps": np.array([50, 700]),
        "alphas_cumprod": scheduler.alphas_cumprod.numpy(),
        "caption_ids": ctext.caption_ids(tokenizer, concept),
        "obj_ids": prompts.obj_ids[0],
        "cat_ids": prompts.cat_ids[0],
        "obj_index": prompts.obj_index[0],
        "cat_index": prompts.cat_index[0],
        "context_mask": prompts.context_mask[0],
        "super_embed": table[super_id],
    }
    learned = table[placeholder_ids] + 0.1 * torch.randn(
        NUM_VECTORS, table.shape[1], generator=gen, dtype=torch.float64
    )
    return unet, text_encoder, placeholder_ids, inputs, learned


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_gradient_matches_finite_difference(setup, variant):
    unet, text_encoder, placeholder_ids, inputs, learned = setup
    # Weights that give each term's gradient a similar size (the attention term is tiny at
    # random weights), so a wrong gradient in any of them shows.
    kwargs = dict(
        lambda_emb=0.1, lambda_attn=2e5 if variant == "paper" else 1.5e4, lambda_pairwise=0.2,
        lambda_hinge=0.02, hinge_margin=1.0, emb_variant=variant, attn_variant=variant,
        placeholder_id=placeholder_ids[0],
    )
    out = ref.core_step_reference(unet, text_encoder, inputs, learned=learned, **kwargs)
    assert out["grad"].shape == learned.shape
    assert all(out[k] > 0 for k in ("emb", "attn", "pairwise", "hinge"))

    direction = torch.randn(learned.shape, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
    direction /= direction.norm()
    eps = 1e-5

    def loss_at(x):
        return ref.core_step_reference(unet, text_encoder, inputs, learned=x, **kwargs)["loss"]

    numeric = (loss_at(learned + eps * direction) - loss_at(learned - eps * direction)) / (2 * eps)
    analytic = float((out["grad"] * direction).sum())
    # Float64 central difference: truncation ~eps^2 |f^(3)| ~ 1e-10 and rounding ~U |f| / eps
    # ~ 1e-11 (U = 1.1e-16) relative to the derivative; 1e-6 is far above both and far below
    # a wrong term's gradient (the weights make each term's gradient comparable in size).
    assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-9)


def test_zero_lambdas_is_the_plain_diffusion_loss(setup):
    unet, text_encoder, placeholder_ids, inputs, learned = setup
    out = ref.core_step_reference(
        unet, text_encoder, inputs, lambda_emb=0.0, lambda_attn=0.0,
        placeholder_id=placeholder_ids, learned=learned,
    )
    assert out["loss"] == out["diffusion"]
    assert out["emb"] > 0 and out["attn"] > 0  # computed, just not weighted in

    # Independently: the learned rows written into a copy of the table, one plain TI forward.
    encoder = copy.deepcopy(text_encoder)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_ids] = learned
    table.requires_grad_(True)
    t = torch.as_tensor(inputs["timesteps"])
    abar = torch.as_tensor(inputs["alphas_cumprod"], dtype=torch.float64)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * inputs["latents"] + (1 - abar).sqrt() * inputs["noise"]
    ids = torch.as_tensor(inputs["caption_ids"], dtype=torch.long).expand(2, -1)
    hidden = encoder(input_ids=ids).last_hidden_state
    loss = torch.mean((unet(x_t, t, hidden).sample - inputs["noise"]) ** 2)
    loss.backward()
    # Float64 (U = 1.1e-16) on both sides, the same layers, possibly other summation orders:
    # a mean of 512 squares is within ~512 U = 6e-14 relative, and gradients through the
    # network within ~1e-12 of their scale; the tolerances leave orders of magnitude.
    np.testing.assert_allclose(out["diffusion"], loss.item(), rtol=1e-12)
    np.testing.assert_allclose(out["grad"], table.grad[placeholder_ids], rtol=1e-9, atol=1e-15)


def test_recorded_attention_is_a_distribution_over_tokens(setup):
    unet, text_encoder, placeholder_ids, inputs, learned = setup
    out = ref.core_step_reference(
        unet, text_encoder, inputs, lambda_emb=0.0, lambda_attn=1.0,
        placeholder_id=placeholder_ids[0], learned=learned,
    )
    for key in ("attn_obj", "attn_cat"):
        stats = out[key]
        assert stats.shape == (16, 2, 77)  # 6 down, 1 mid, 9 up cross-attention layers
        assert bool((stats >= 0).all())
        # Float64 softmax rows sum to 1 within a few U (1.1e-16); means and a 77-term sum add
        # ~100 U = 1e-14.
        np.testing.assert_allclose(stats.sum(-1), 1.0, atol=1e-12)
    # Same x_t, different text: the two passes' statistics differ.
    assert not torch.allclose(out["attn_obj"], out["attn_cat"])


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_benchmark_step_runs(variant):
    result = ref.run_benchmark("tiny", variant, steps=1, batch=2, warmup=1, threads=1)
    assert result["framework"] == "torch" and result["variant"] == variant
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert math.isfinite(result["final_loss"])

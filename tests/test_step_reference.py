"""One full CoRe step against a second, straightforward writing in PyTorch.

Our random tiny models are exported with `core_jax.weights` and loaded by diffusers and
transformers; both sides get the same latents, noise, timesteps and template (drawn by our
step's own `draw_batch`). The PyTorch side (`benchmarks/torch_reference.py`) puts the
learned vectors in the embedding table and runs the official structure: caption pass, y* pass
with gradient, y_cat pass without, attention probabilities recorded by a processor.

Tolerance: loss terms to 1e-4 relative and the gradient to 1e-4 of its largest entry. Both sides
run fp32 through ~40 layers with different summation orders (the U-Net forward agrees to ~1e-6
relative, up to ~1e-5 at worst: see test_models.py); the attention term is a squared difference
of near-equal probabilities, which turns that into a relative error of ~1e-5, and its gradient
carries the same difference (lambda_attn x 2 (s_obj - s_cat)), so up to ~1e-5 of the gradient's
scale, plus the backward pass's own ~1e-6. Measured: 6e-7 on the terms, 4e-7 of the gradient's
largest entry. A missing or mis-weighted term is off by 1e-2 or more.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from core_jax import weights  # noqa: E402
from core_jax.bench.reference import load_torch_reference  # noqa: E402
from core_jax.text import (  # noqa: E402
    add_placeholder_tokens,
    load_templates,
    load_tokenizer,
    placeholder_string,
    regularization_prompts,
)
from core_jax.train.passes import draw_batch  # noqa: E402
from core_jax.train.step import stage_loss  # noqa: E402
from core_jax.train.synthetic import random_setup  # noqa: E402


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_core_step_matches_pytorch(tmp_path, variant):
    num_vectors, batch = 2, 3
    setup = random_setup(
        "tiny", batch_size=batch, num_vectors=num_vectors, emb_variant=variant,
        attn_variant=variant, lambda_emb=0.3, lambda_attn=50.0, lambda_pairwise=0.2,
        lambda_hinge=0.5, hinge_margin=0.99,
    )
    # Learned vectors away from the super-category, so every term is non-zero.
    start = setup.state.params["embeds"]
    embeds = start + 0.02 * jax.random.normal(jax.random.key(1), start.shape)
    draw = jax.jit(functools.partial(draw_batch, rows=jnp.arange(batch)))
    inputs = draw(setup.state.rng, setup.state.step, setup.data, setup.schedule)
    loss_fn = functools.partial(stage_loss, program=setup.program)
    grads, terms = jax.jit(jax.grad(loss_fn, has_aux=True))(
        {"embeds": embeds}, setup.state.params, inputs, setup.data, setup.numbers, setup.frozen,
        setup.schedule,
    )
    grads = grads["embeds"]

    weights.save_unet(tmp_path / "unet", setup.unet, setup.frozen["unet"])
    weights.save_text_encoder(tmp_path / "text_encoder", setup.text_encoder, setup.frozen["text"])
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    text_encoder = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()

    # The y_cat ids are not kept by the step (it keeps their encodings): rebuild them.
    tokenizer = load_tokenizer()
    add_placeholder_tokens(tokenizer, "<s*>", num_vectors)
    t = int(inputs.template[0])
    data = jax.device_get(setup.data)
    template = load_templates("animate")[t]  # concept 0 of random_setup: a cat
    prompts = regularization_prompts(
        tokenizer, template, placeholder_string("<s*>", num_vectors), "cat"
    )
    np.testing.assert_array_equal(prompts.obj_ids[0], data.obj_ids[0, t])
    numbers = jax.device_get(setup.numbers)
    expected = load_torch_reference().core_step_reference(
        unet, text_encoder,
        {
            "latents": np.asarray(inputs.x0).transpose(0, 3, 1, 2),
            "noise": np.asarray(inputs.noise).transpose(0, 3, 1, 2),
            "timesteps": np.asarray(inputs.timesteps),
            "alphas_cumprod": np.asarray(setup.schedule.alphas_cumprod),
            "caption_ids": np.asarray(setup.program.models.caption_ids),
            "obj_ids": data.obj_ids[0, t],
            "cat_ids": prompts.cat_ids[0],
            "obj_index": data.obj_index[0, t],
            "cat_index": data.cat_index[0, t],
            "context_mask": data.context_mask[0, t],
            "super_embed": data.super_embed[0],
        },
        **{key: float(numbers[key][0]) for key in (
            "lambda_emb", "lambda_attn", "lambda_pairwise", "lambda_hinge", "hinge_margin")},
        emb_variant=variant, attn_variant=variant,
        placeholder_id=list(setup.program.models.placeholder_ids), learned=np.asarray(embeds[0]),
    )
    for name in ("diffusion", "emb", "attn", "pairwise", "hinge", "loss"):
        assert expected[name] > 0, name  # every term is live
        np.testing.assert_allclose(float(terms[name][0]), expected[name], rtol=1e-4, err_msg=name)
    torch_grad = expected["grad"].detach().numpy()
    scale = np.abs(torch_grad).max()
    np.testing.assert_allclose(np.asarray(grads[0]) / scale, torch_grad / scale, rtol=0,
                               atol=1e-4)


"""bf16 compute with fp32 master parameters (`config.model.dtype = "bfloat16"`): the softmax,
the attention statistics and the losses stay fp32, and the CoRe step's terms are within a
stated tolerance of fp32's on the same weights and batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import packing
import pytest

from core_jax.models import attention
from core_jax.train.synthetic import random_setup

# The tiny preset, CoRe with every stage-1 term weighted (pairwise, hinge too; the hinge's
# margin is above the cosines the moved S* gives, so it is live).
CORE = dict(preset="tiny", unet_overrides={"layers_per_block": 1}, batch_size=2,
            lambda_pairwise=0.01, lambda_hinge=0.1, hinge_margin=0.9999)
# Relative tolerances, bf16 against fp32, at the first step (same weights, same batch, S*
# moved off the super-category's embedding so that every regularizer is non-zero). bf16 keeps
# 8 bits (4e-3 per rounding); measured here: the diffusion term (= the loss) 3e-4, the
# gradient's norm 1e-2 (it goes back through every bf16 layer), L_emb 1.5e-2 and pairwise
# 1.5e-3 (cosines of encodings through 2 bf16 layers), L_attn 8e-2 (a squared difference of
# nearly equal probabilities, ~1e-7 in size: the rounding of each probability is amplified).
# A term computed in bf16 end to end, or statistics that lost their fp32 softmax, miss these
# by far (L_attn: by orders of magnitude).
RTOL = {"loss": 1e-2, "diffusion": 1e-2, "grad_norm": 0.1, "emb": 0.1, "pairwise": 0.05,
        "hinge": 0.1, "attn": 0.3}


@pytest.mark.parametrize("implementation", ["explicit", "chunked"])
def test_softmax_and_statistics_stay_fp32_in_bf16(implementation):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((2, 130, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)))
    out, mean, var = attention.attention_with_stats(q, k, v, 0.3, implementation=implementation)
    assert out.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    assert attention.attention_probabilities(q, k, 0.3).dtype == jnp.float32
    # Probabilities over 7 keys sum to one per query: per-key means sum to one to fp32's
    # precision, which bf16 probabilities (2^-8) would miss by far.
    np.testing.assert_allclose(np.asarray(mean).sum(-1), 1.0, atol=1e-5)


def test_bf16_core_step_terms_are_within_tolerance_of_fp32():
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        setup = random_setup(**CORE, dtype=dtype)
        # S* starts at the super-category's embedding, where every regularizer is zero: move it
        # (the same fp32 master vectors for both dtypes) so that they all measure something.
        embeds = np.asarray(setup.state.params["embeds"])
        scale = np.linalg.norm(embeds, axis=-1, keepdims=True) / np.sqrt(embeds.shape[-1])
        moved = embeds + 0.5 * scale * np.random.default_rng(0).standard_normal(embeds.shape)
        setup.state = setup.state.replace(
            params={**setup.state.params, "embeds": jnp.asarray(moved, jnp.float32)})
        _, history = packing.run_steps(setup, packing.one_device_step(setup), 1)
        metrics[dtype] = jax.device_get(history[0])
    fp32, bf16 = metrics["float32"], metrics["bfloat16"]
    assert set(RTOL) <= set(fp32)
    for name in ("emb", "attn", "pairwise", "hinge"):
        assert np.all(np.asarray(fp32[name]) > 0), name  # live
    for name, rtol in RTOL.items():
        assert np.asarray(bf16[name]).dtype == np.float32, name  # the terms are fp32
        expected, got = np.asarray(fp32[name]), np.asarray(bf16[name])
        assert np.all(np.abs(got - expected) <= rtol * np.abs(expected)), (name, expected, got)

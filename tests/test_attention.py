"""Attention by implementation (`config.model.attention`): every implementation this machine
has equals the explicit form, alone and through the U-Net, values and gradients; the
statistics-recording cross-attention computes its statistics blockwise and never holds more
than one block of the probability map; "auto" picks by backend; unknown names are refused.
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_trees_close_to_scale

from core_jax.config import base_config
from core_jax.errors import InputError
from core_jax.models import attention
from core_jax.models.presets import get_preset, random_models
from core_jax.models.unet import UNet2DConditionModel, cross_attention_stats
from core_jax.train import setup as run_setup


def _has_cuda_gpu() -> bool:
    return jax.default_backend() == "gpu" and hasattr(jax.devices()[0], "compute_capability")


# cuDNN's kernel exists on CUDA GPUs only, and takes fp16/bf16 only: tested there, in bf16.
AVAILABLE = ["explicit", "chunked", "xla", "auto"] + (["cudnn"] if _has_cuda_gpu() else [])


def _qkv(batch, n_q, n_k, heads, dim, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, n_q, heads, dim)) * 2.0  # peaked softmax rows too
    k, v = (rng.standard_normal((batch, n_k, heads, dim)) for _ in range(2))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _value_and_grads(fn, *args):
    """fn's outputs and the gradients of a fixed random projection of them w.r.t. args."""
    def loss(*a):
        outs = jax.tree.leaves(fn(*a))
        weights = [jnp.asarray(np.random.default_rng(i).standard_normal(o.shape), jnp.float32)
                   for i, o in enumerate(outs)]
        pairs = zip(outs, weights, strict=True)
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in pairs), outs

    (_, outs), grads = jax.jit(
        jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
    )(*args)
    return outs, grads


@pytest.mark.parametrize("implementation", AVAILABLE)
@pytest.mark.parametrize("n_q, n_k", [(150, 150), (150, 7), (40, 40)])
def test_each_implementation_equals_explicit_values_and_gradients(implementation, n_q, n_k):
    """Long self-attention (several chunks, the last padded), cross-attention (7 keys) and a
    sequence shorter than one chunk. fp32 (cuDNN: bf16, its only float dtype on our path)."""
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    q, k, v = _qkv(2, n_q, n_k, 3, 8, dtype=dtype)
    outs, grads = _value_and_grads(
        lambda *a: attention.dot_product_attention(*a, 0.4, implementation=implementation),
        q, k, v)
    ref_outs, ref_grads = _value_and_grads(
        lambda *a: attention.explicit_attention(*a, 0.4), q, k, v)
    # fp32: the forms sum the same terms in other orders (a few U of 1); bf16: 8 bits.
    tol = 5e-2 if dtype == jnp.bfloat16 else 2e-5
    chex.assert_trees_all_close(outs, ref_outs, rtol=tol, atol=tol)
    chex.assert_trees_all_close(grads, ref_grads, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_q, chunk", [(150, 64), (64, 16), (5, 64), (100, 33)])
def test_blockwise_stats_equal_the_explicit_form_values_and_gradients(n_q, chunk):
    """Output, per-key mean and variance over heads and queries: blockwise (with padded
    queries masked out of the sums) against the whole map, and their gradients."""
    q, k, v = _qkv(2, n_q, 7, 4, 8, seed=3)

    def explicit(q, k, v):
        return attention.attention_with_stats(q, k, v, 0.35, implementation="explicit")

    def blockwise(q, k, v):
        return attention.blockwise_attention_with_stats(q, k, v, 0.35, chunk=chunk)

    outs, grads = _value_and_grads(blockwise, q, k, v)
    ref_outs, ref_grads = _value_and_grads(explicit, q, k, v)
    assert [o.shape for o in outs] == [(2, n_q, 4, 8), (2, 7), (2, 7)]
    chex.assert_trees_all_close(outs, ref_outs, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=2e-5, atol=2e-6)


def _largest_top_level_array(fn, *args) -> int:
    """Elements of the largest array the program of fn's value and gradients holds outside its
    loops: what a scan stores for its backward pass appears here, stacked over iterations."""
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: sum(jnp.sum(x) for x in fn(*a))))(*args)
    return max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)


def test_blockwise_stats_never_hold_the_whole_map():
    """[B, H, N, T] = [2, 4, 512, 77] is 315k scores; the blockwise form's gradient program
    holds nothing that large outside its loop (each block is [2, 4, 64, 77]); the explicit
    form's does, which is what makes this test able to fail."""
    q, k, v = _qkv(2, 512, 77, 4, 8)
    full_map = 2 * 4 * 512 * 77

    def blockwise(q, k, v):
        return attention.attention_with_stats(q, k, v, 0.35, implementation="chunked")

    def explicit(q, k, v):
        return attention.attention_with_stats(q, k, v, 0.35, implementation="explicit")

    assert _largest_top_level_array(explicit, q, k, v) >= full_map
    assert _largest_top_level_array(blockwise, q, k, v) < full_map // 4


def test_auto_picks_by_backend(monkeypatch):
    long, short = _qkv(1, 2 * attention.CHUNK, 7, 2, 8), _qkv(1, attention.CHUNK, 7, 2, 8)
    resolve = attention.resolve_implementation
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve("auto", *long[:2]) == "chunked"
    assert resolve("auto", *short[:2]) == "explicit"
    assert resolve("xla", *long[:2]) == "xla"  # a forced name is taken as is
    with attention.explicit_attention_only():  # cost analysis: no loops, no custom calls
        assert resolve("chunked", *long[:2]) == "explicit"

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve("auto", *long[:2]) == "xla"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capability, head_dim, dtype, expected in [
        ("9.0", 160, jnp.bfloat16, "cudnn"),  # SD 1.5's widest head dim, Hopper
        ("8.0", 160, jnp.bfloat16, "xla"),  # above 128 before Hopper
        ("8.0", 64, jnp.float16, "cudnn"),
        ("9.0", 64, jnp.float32, "xla"),  # fp32: no cuDNN kernel
        ("9.0", 20, jnp.bfloat16, "xla"),  # not a multiple of 8
        ("gfx90a", 64, jnp.bfloat16, "xla"),  # ROCm
    ]:
        device = types.SimpleNamespace(compute_capability=capability)
        monkeypatch.setattr(jax, "devices", lambda device=device: [device])
        q = jnp.zeros((1, 4096, 8, head_dim), dtype)
        assert resolve("auto", q, q) == expected, (capability, head_dim, dtype)


def test_unknown_implementation_names_the_choices():
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="choose one of auto, explicit, chunked, xla, cudnn"):
        attention.dot_product_attention(q, k, v, 0.5, implementation="flash")
    config = base_config()
    config.concept.super_category = "dog"
    config.model.attention = "flash"
    with pytest.raises(InputError, match="model.attention is 'flash'; choose one of auto, "
                                         "explicit, chunked, xla, cudnn"):
        run_setup.check_config(config)


def test_load_models_sets_the_modules_fields():
    config = base_config()
    config.model.preset = "micro"
    config.model.attention, config.model.remat = "explicit", "unet_block"
    models = run_setup.load_models(config)
    assert (models.unet.attention, models.unet.remat) == ("explicit", "unet_block")
    assert models.vae.attention == "explicit"


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny preset's U-Net at 16x16 latents: 256 queries in the first level (4 chunks),
    64 in the next, 16 in the last, and 7 context tokens."""
    models = random_models(get_preset("tiny"), seed=5)
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32),
              jnp.asarray([10.0, 700.0]),
              jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32))
    return models.unet, models.params["unet"], inputs


def unet_outputs_and_grads(unet: UNet2DConditionModel, params, inputs):
    """The U-Net's output and recorded statistics, and their gradients w.r.t. the parameters
    and the inputs (a fixed random projection of all three)."""
    def run(params, sample, context):
        out, state = unet.apply({"params": params}, sample, inputs[1], context,
                                mutable=["attn_stats"])
        return out, cross_attention_stats(state, "mean"), cross_attention_stats(state, "var")

    return _value_and_grads(run, params, inputs[0], inputs[2])


@pytest.fixture(scope="module")
def explicit_unet_results(tiny_unet):
    unet, params, inputs = tiny_unet
    return {dtype: unet_outputs_and_grads(unet.clone(attention="explicit", dtype=dtype), params,
                                          inputs)
            for dtype in ([jnp.float32] + ([jnp.bfloat16] if "cudnn" in AVAILABLE else []))}


@pytest.mark.parametrize("implementation", [i for i in AVAILABLE if i != "explicit"])
def test_unet_with_each_implementation_equals_explicit(
    tiny_unet, explicit_unet_results, implementation
):
    unet, params, inputs = tiny_unet
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    outs, grads = unet_outputs_and_grads(
        unet.clone(attention=implementation, dtype=dtype), params, inputs
    )
    ref_outs, ref_grads = explicit_unet_results[dtype]
    # Through ~30 layers the forms' fp32 rounding differences (a few U each) stay ~1e-6 of
    # each leaf's scale (element-wise, an entry that cancels to near zero can differ by 1e-3
    # of itself: CI's CPU showed one); bf16 (cuDNN) rounds at 4e-3 per layer.
    tol = 1e-1 if implementation == "cudnn" else 2e-5
    assert_trees_close_to_scale((outs, grads), (ref_outs, ref_grads), tol)

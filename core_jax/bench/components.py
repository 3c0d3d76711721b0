"""Component benchmarks: the single pieces the optimizations of BENCHMARKS.md are about (the
attention, the group norm, the U-Net to its conditioning), forward + backward, against PyTorch
where it has the same piece."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.bench.measure import Result, interleaved
from core_jax.bench.programs import build_setup
from core_jax.models import attention
from core_jax.models.layers import GroupNorm
from core_jax.train.synthetic import Setup

COMPONENTS = ("attention", "group_norm", "unet")
# XLA:CPU's default library fusions minus INDIVIDUAL_CONVOLUTION: convolutions go back to Eigen
# (what XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution does).
NO_YNN_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def _component(name: str, framework: str, times: list[float], note: str) -> Result:
    median = statistics.median(times)
    return Result(
        variant=name, framework=framework, preset="bench_small", batch=6, steps=len(times),
        median_s=median, min_s=min(times), max_s=max(times), examples_per_s=6 / median,
        note=note,
    )


def group_norm_by_reshape(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                          eps: float) -> jax.Array:
    """GroupNorm written the textbook way (reshape to [..., groups, C / groups]): the baseline
    `layers.GroupNorm`'s per-channel formulation is measured against."""
    shape = x.shape
    g = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(shape) * scale + bias


def _jax_fwd_bwd(fn: Callable[..., jax.Array], *args: jax.Array) -> Callable[[], Any]:
    """A no-argument callable running fn's forward and backward (w.r.t. every argument) with a
    fixed random cotangent, blocked on the result."""
    out_shape = jax.eval_shape(fn, *args)
    cotangent = jax.random.normal(jax.random.key(1), out_shape.shape, out_shape.dtype)
    run = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cotangent))
    return lambda: jax.block_until_ready(run(*args))


def run_components(
    components: Sequence[str],
    *,
    repeats: int = 10,
    vs_torch: bool = False,
    torch_threads: int | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """Forward + backward of single pieces at bench-small shapes (batch 6), JAX and PyTorch,
    the candidates of each piece called round-robin `repeats` times:

    - `attention`: self-attention at 32x32 latents (1024 tokens, 8 heads of 8): the chunked
      (flash-style) form, the explicit form, torch's `scaled_dot_product_attention`;
    - `group_norm`: [6, 32, 32, 64], 32 groups: `layers.GroupNorm` and the reshape form;
    - `unet`: the bench-small U-Net to the conditioning (what stage 1 differentiates), with
      the default (chunked) and the explicit self-attention, and with convolutions compiled
      without YNNPACK; diffusers' U-Net in torch.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    torch = _import_torch(torch_threads) if vs_torch else None
    rng = np.random.default_rng(0)
    results: list[Result] = []
    for component in components:
        # (framework, note, no-argument callable running forward + backward once)
        candidates: list[tuple[str, str, Callable[[], Any]]] = []
        if component == "attention":
            q, k, v = (jnp.asarray(rng.standard_normal((6, 1024, 8, 8)), jnp.float32)
                       for _ in range(3))
            for form, fn in (("chunked", attention.chunked_attention),
                             ("explicit", attention.explicit_attention)):
                candidates.append(("jax", form, _jax_fwd_bwd(
                    lambda q, k, v, fn=fn: fn(q, k, v, 8**-0.5), q, k, v)))
            if torch:
                candidates.append(("torch", "sdpa", _torch_sdpa(torch, q, k, v)))
        elif component == "group_norm":
            x = jnp.asarray(rng.standard_normal((6, 32, 32, 64)), jnp.float32)
            norm = GroupNorm(32)
            params = norm.init(jax.random.key(0), x)["params"]
            candidates.append(("jax", "per-channel sums", _jax_fwd_bwd(
                lambda x, p, norm=norm: norm.apply({"params": p}, x), x, params)))
            candidates.append(("jax", "reshape", _jax_fwd_bwd(
                lambda x, p: group_norm_by_reshape(x, p["scale"], p["bias"], 32, 1e-5),
                x, params)))
            if torch:
                candidates.append(("torch", "F.group_norm", _torch_group_norm(torch, x)))
        elif component == "unet":
            setup = build_setup("bench_small", 6)
            candidates.append(("jax", "chunked self-attention", _unet_to_context(setup)))
            candidates.append(("jax", "explicit self-attention",
                               _unet_to_context(setup, explicit=True)))
            candidates.append(("jax", "chunked, convolutions not in YNNPACK", _unet_to_context(
                setup, compiler_options=NO_YNN_CONVOLUTIONS)))
            if torch:
                candidates.append(("torch", "diffusers", _torch_unet(torch, "bench_small", 6)))
        times = interleaved([fn for _, _, fn in candidates], repeats)
        for (framework, note, _), record in zip(candidates, times, strict=True):
            result = _component(component, framework, record, note)
            results.append(result)
            emit(result)
    return results


def _unet_to_context(
    setup: Setup, explicit: bool = False, compiler_options: dict[str, str] | None = None
) -> Callable[[], Any]:
    """Forward + backward of the U-Net (with its attention statistics) to the conditioning, the
    part of the stage-1 step that dominates it; latents, timesteps and context fixed."""
    size, batch = setup.unet.config.sample_size, 6
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 4))
    t = jnp.arange(batch) * 150
    context = setup.data.cat_hidden[0, :1].repeat(batch, 0)
    params = setup.frozen["unet"]

    def run(params: Any, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        def loss(context: jax.Array) -> jax.Array:
            out, _ = setup.unet.apply({"params": params}, x, t, context, mutable=["attn_stats"])
            return jnp.mean(jnp.square(out))

        return jax.value_and_grad(loss)(context)

    form = attention.explicit_attention_only() if explicit else contextlib.nullcontext()
    with form:
        compiled = jax.jit(run).lower(params, context).compile(compiler_options)
    return lambda: jax.block_until_ready(compiled(params, context))


# --- the PyTorch candidates -------------------------------------------------------------------


def _import_torch(threads: int | None) -> ModuleType:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch


def _torch_fwd_bwd(torch: ModuleType, fn: Callable[..., Any], *arrays: np.ndarray
                   ) -> Callable[[], Any]:
    inputs = [torch.tensor(np.asarray(a)).requires_grad_(True) for a in arrays]
    cotangent = torch.randn_like(fn(*inputs))

    def run() -> Any:
        return torch.autograd.grad(fn(*inputs), inputs, cotangent)

    return run


def _torch_sdpa(torch: ModuleType, q: jax.Array, k: jax.Array, v: jax.Array
                ) -> Callable[[], Any]:
    heads_first = [np.ascontiguousarray(np.asarray(a).transpose(0, 2, 1, 3)) for a in (q, k, v)]
    return _torch_fwd_bwd(torch, torch.nn.functional.scaled_dot_product_attention, *heads_first)


def _torch_group_norm(torch: ModuleType, x: jax.Array) -> Callable[[], Any]:
    channels_first = np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))
    scale, bias = np.ones(x.shape[-1], np.float32), np.zeros(x.shape[-1], np.float32)
    return _torch_fwd_bwd(
        torch, lambda x, w, b: torch.nn.functional.group_norm(x, 32, w, b, 1e-5),
        channels_first, scale, bias,
    )


def _torch_unet(torch: ModuleType, preset: str, batch: int) -> Callable[[], Any]:
    from diffusers import UNet2DConditionModel

    from core_jax.models.presets import get_preset

    config = get_preset(preset).unet
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config.to_diffusers()).requires_grad_(False)
    size = config.sample_size
    x, t = torch.randn(batch, 4, size, size), torch.arange(batch) * 150
    context = torch.randn(batch, 77, config.cross_attention_dim, requires_grad=True)

    def run() -> Any:
        loss = unet(x, t, context).sample.square().mean()
        return torch.autograd.grad(loss, context)[0]

    return run

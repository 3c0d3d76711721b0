"""Classifier-free guidance."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core_jax.diffusion.samplers import ModelFn


def cfg_combine(uncond: jax.Array, cond: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
    """``uncond + s * (cond - uncond)`` for ``[B, ...]`` predictions; scale 1 gives ``cond``."""
    return uncond + guidance_scale * (cond - uncond)


def guided(model_fn_uncond_cond: ModelFn, guidance_scale: float | jax.Array) -> ModelFn:
    """Wraps a doubled-batch model function into a guided ``model_fn(x_t [B, ...], t [B])``.

    ``model_fn_uncond_cond(x [2B, ...], t [2B]) -> [2B, ...]`` must treat rows ``[:B]`` as
    unconditional and rows ``[B:]`` as conditional (diffusers' order: it typically closes over
    text embeddings ``concat([uncond_emb, cond_emb])``). Both halves run in one model call, which
    is what makes guidance cost one batched U-Net pass per step instead of two.

    Build the result once and reuse it: ``sample`` caches its compilation on ``model_fn``.
    """

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn_uncond_cond(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]))
        uncond, cond = jnp.split(out, 2)
        return cfg_combine(uncond, cond, guidance_scale)

    return model_fn

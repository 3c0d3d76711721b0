"""Scaled dot-product attention on [B, N, H, D] tensors (queries, keys and values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_probabilities(
    q: jax.Array, k: jax.Array, scale: float, upcast: bool = False
) -> jax.Array:
    """Softmax attention probabilities [B, H, N, T] in fp32 for q [B, N, H, D], k [B, T, H, D]."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bnhd,bthd->bhnt", q * jnp.asarray(scale, q.dtype), k)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = False
) -> jax.Array:
    """softmax(q k^T * scale) v, returned as [B, N, H, D]."""
    probs = attention_probabilities(q, k, scale, upcast)
    return jnp.einsum("bhnt,bthd->bnhd", probs.astype(v.dtype), v)

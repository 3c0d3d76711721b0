"""Scaled dot-product attention on [B, N, H, D] tensors (queries, keys and values).

Implementations of the same function (`IMPLEMENTATIONS`, chosen per module by a field that
`config.model.attention` sets):

- "explicit" (`attention_probabilities` / `explicit_attention`): the whole [B, H, N, T]
  probability map.
- "chunked" (`chunked_attention`): flash-style, for long self-attention on CPU. Queries are
  processed in chunks of 64 and batch x head groups a few at a time, under `lax.map`/`lax.scan`,
  so each step's score block (about 4 MB) stays in cache instead of streaming 200 MB maps through
  memory; the backward pass (its own `custom_vjp`) recomputes the probabilities from the saved
  log-sum-exp instead of storing them. Every matrix product is a plain row-major
  `[G, M, K] @ [G, K, N]` (G = batch x heads leading), the one layout XLA:CPU hands to its fast
  dot library: both passes work on transposed score blocks (keys on rows) to keep it so.
- "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation (cuDNN's fused
  flash attention takes fp16/bf16 only, head dims a multiple of 8 up to 128, or 256 from
  Hopper on).
- "auto": chunked on CPU when there are several chunks of queries (explicit for short
  sequences, where it is as fast); on CUDA GPUs cuDNN where it applies, else XLA's; XLA's on
  TPU and elsewhere.

Cross-attention layers that record per-token statistics for the regularizers use
`attention_with_stats`: the explicit form under "explicit", otherwise the statistics and the
output are computed together over blocks of queries (`blockwise_attention_with_stats`), whose
probabilities are recomputed in the backward pass, so no more than one block of the
[B, H, N, T] map is ever held.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

# Queries per chunk. Measured on the bench-small shapes (1024 and 256 tokens, 8 heads, batch 6
# and 12): 64 beat 16, 32, 128 and 256 by 10-40 % in fwd+bwd.
CHUNK = 64
# Batch x head groups are processed a few at a time too, so one step's [groups, chunk, T] score
# block is about 4 MB (16 groups at T = 1024): it stays in the cores' L2 across the step's
# five or so passes. Measured at 1024 tokens: 25-40 % less fwd+bwd time than all groups at once.
_BLOCK_ELEMENTS = 1 << 20
# Scores per block of the statistics-recording form off CPU (64 MB in fp32): large enough that
# SD-sized cross-attention runs in one or a few blocks, so the loop costs the GPU/TPU nothing.
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 24
IMPLEMENTATIONS = ("auto", "explicit", "chunked", "xla", "cudnn")
_EXPLICIT_ONLY = contextvars.ContextVar("explicit_attention_only", default=False)


@contextlib.contextmanager
def explicit_attention_only() -> Iterator[None]:
    """Functions traced inside the block use the explicit form everywhere. For XLA's cost
    analysis, which counts a loop body once: the chunked loop would hide most attention FLOPs."""
    token = _EXPLICIT_ONLY.set(True)
    try:
        yield
    finally:
        _EXPLICIT_ONLY.reset(token)


def attention_probabilities(
    q: jax.Array, k: jax.Array, scale: float, upcast: bool = False
) -> jax.Array:
    """Softmax attention probabilities [B, H, N, T] in fp32 for q [B, N, H, D], k [B, T, H, D]."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # Heads-major operands make both products plain batched [N, D] @ [D, T] matrix products.
    q_heads = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, N, D]
    k_t = k.transpose(0, 2, 3, 1)  # [B, H, D, T]
    return jax.nn.softmax((q_heads @ k_t).astype(jnp.float32), axis=-1)


def weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [B, H, N, T] applied to v [B, T, H, D]: [B, N, H, D] in v's dtype."""
    out = probs.astype(v.dtype) @ v.transpose(0, 2, 1, 3)  # [B, H, N, D]
    return out.transpose(0, 2, 1, 3)


def explicit_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = False
) -> jax.Array:
    """softmax(q k^T * scale) v through the full probability map, returned as [B, N, H, D]."""
    return weighted_values(attention_probabilities(q, k, scale, upcast), v)


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int = CHUNK
) -> jax.Array:
    """softmax(q k^T * scale) v, flash-style in query chunks; [B, N, H, D] in and out.

    Math is fp32 whatever the input dtype; the result has v's dtype. Any N works: the queries
    are zero-padded to a multiple of `chunk` (padded rows get no gradient and are dropped).
    """
    batch, n_q, heads, dim = q.shape

    def groups(x: jax.Array) -> jax.Array:  # [B, N, H, D] -> [B*H, N, D]
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(batch * heads, -1, dim)

    chunk = min(chunk, n_q)
    pad = -n_q % chunk
    qg = groups(q) * scale
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0)))
    group_chunk = _group_chunk(batch * heads, chunk, k.shape[1])
    out = _flash(qg, groups(k), groups(v), chunk, group_chunk)[:, :n_q]
    return out.reshape(batch, heads, n_q, dim).transpose(0, 2, 1, 3).astype(v.dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """softmax(q k^T * scale) v as [B, N, H, D] by `implementation` (see the module docstring)."""
    chosen = resolve_implementation(implementation, q, k)
    if chosen == "chunked":
        return chunked_attention(q, k, v, scale)
    if chosen in ("xla", "cudnn"):
        # Both keep the scores and the softmax in fp32 whatever q's dtype: `upcast` holds.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=chosen)
    return explicit_attention(q, k, v, scale, upcast)


def resolve_implementation(implementation: str, q: jax.Array, k: jax.Array) -> str:
    """The implementation `implementation` means for these operands on this backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is unknown; choose one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    if _EXPLICIT_ONLY.get():
        return "explicit"
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "chunked" if q.shape[1] > CHUNK else "explicit"
    if backend == "gpu" and cudnn_applies(q, k):
        return "cudnn"
    return "xla"


def cudnn_applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN's fused attention takes these operands on this machine's first device:
    a CUDA GPU, fp16/bf16, a head dim that is a multiple of 8 and at most 128 (256 from compute
    capability 9.0 on), as jax's `check_is_flash_attention` requires."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return False
    device = jax.devices()[0]
    try:
        capability = float(getattr(device, "compute_capability", ""))
    except ValueError:  # not a CUDA device (ROCm names its targets gfx...)
        return False
    head_dim = q.shape[-1]
    return head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def attention_with_stats(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = False,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Output [B, N, H, D] and the mean and variance [B, T] of each key's probability over heads
    and queries. "explicit" reads them off the whole map; any other implementation computes
    them blockwise with the output (`blockwise_attention_with_stats`): on CPU in blocks of
    `CHUNK` queries, elsewhere in blocks of up to `_ACCELERATOR_BLOCK_ELEMENTS` scores."""
    chosen = resolve_implementation(implementation, q, k)
    if chosen == "explicit":
        probs = attention_probabilities(q, k, scale, upcast)  # [B, H, N, T]
        mean = jnp.mean(probs, axis=(1, 2))
        var = jnp.mean(jnp.square(probs), axis=(1, 2)) - jnp.square(mean)
        return weighted_values(probs, v), mean, var
    chunk = CHUNK
    if jax.default_backend() != "cpu":
        per_query = q.shape[0] * q.shape[2] * k.shape[1]
        chunk = max(CHUNK, _ACCELERATOR_BLOCK_ELEMENTS // per_query)
    return blockwise_attention_with_stats(q, k, v, scale, upcast, chunk)


def blockwise_attention_with_stats(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = False,
    chunk: int = CHUNK,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`attention_with_stats` over blocks of `chunk` queries under `lax.map`: each block's
    probabilities give its output and its per-key sums of p and p^2 (zero-padded queries
    masked out), and are recomputed in the backward pass (`jax.checkpoint`), so only one
    [B, H, chunk, T] block is live at a time."""
    batch, n_q, heads, dim = q.shape
    chunk = min(chunk, n_q)
    n_chunks = -(-n_q // chunk)
    padded = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - n_q), (0, 0), (0, 0)))
    q_chunks = padded.reshape(batch, n_chunks, chunk, heads, dim).swapaxes(0, 1)
    real = (jnp.arange(n_chunks * chunk) < n_q).reshape(n_chunks, chunk)

    @jax.checkpoint
    def block(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_c, real_c = xs
        probs = attention_probabilities(q_c, k, scale, upcast)  # [B, H, chunk, T]
        counted = probs * real_c[None, None, :, None]
        return (weighted_values(probs, v), jnp.sum(counted, axis=(1, 2)),
                jnp.sum(counted * probs, axis=(1, 2)))

    out, sums, square_sums = jax.lax.map(block, (q_chunks, real))
    out = out.swapaxes(0, 1).reshape(batch, n_chunks * chunk, heads, dim)[:, :n_q]
    count = heads * n_q
    mean = jnp.sum(sums, axis=0) / count
    var = jnp.sum(square_sums, axis=0) / count - jnp.square(mean)
    return out, mean, var


def _group_chunk(groups: int, chunk: int, num_keys: int) -> int:
    """The largest divisor of `groups` whose score block fits `_BLOCK_ELEMENTS`."""
    limit = max(1, _BLOCK_ELEMENTS // (chunk * num_keys))
    return max(d for d in range(1, min(groups, limit) + 1) if groups % d == 0)


def _split(x: jax.Array, chunk: int) -> jax.Array:
    """[G, N, ...] -> [N / chunk, G, chunk, ...]: chunks leading, for map/scan."""
    g, n = x.shape[:2]
    return x.reshape((g, n // chunk, chunk) + x.shape[2:]).swapaxes(0, 1)


def _merge(x: jax.Array) -> jax.Array:
    """Inverse of `_split`."""
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])


def _per_group_chunk(fn: Callable[..., Any], group_chunk: int, *arrays: jax.Array) -> Any:
    """fn over slices of `group_chunk` groups (leading axis) under `lax.map`; results joined."""
    g = arrays[0].shape[0]
    split = [a.reshape((g // group_chunk, group_chunk) + a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(split))
    return jax.tree.map(lambda a: a.reshape((g,) + a.shape[2:]), out)


def _split_t(x: jax.Array, chunk: int) -> jax.Array:
    """[G, N, D] -> [N / chunk, G, D, chunk]: chunks leading, each chunk transposed."""
    g, n, d = x.shape
    return x.swapaxes(1, 2).reshape(g, d, n // chunk, chunk).transpose(2, 0, 1, 3)


def _merge_t(x: jax.Array) -> jax.Array:
    """Inverse of `_split_t`."""
    n, g, d, c = x.shape
    return x.transpose(1, 0, 3, 2).reshape(g, n * c, d)


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Output [G, N, D] and log-sum-exp [G, N] for pre-scaled q [G, N, D], k, v [G, T, D]."""
    v_t = v.swapaxes(1, 2)  # [G, D, T], once

    def one(q_c_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Scores with keys on rows, [G, T, c]: the max and sum over keys run across rows
        # (element-wise over c lanes), which measured 10-20 % faster than along each row.
        scores_t = k @ q_c_t
        peak = jnp.max(scores_t, axis=1, keepdims=True)  # [G, 1, c]
        e_t = jnp.exp(scores_t - peak)
        total = jnp.sum(e_t, axis=1, keepdims=True)
        return (v_t @ e_t) / total, (peak + jnp.log(total))[:, 0]  # out^T [G, D, c], [G, c]

    out_t, lse = jax.lax.map(one, _split_t(q, chunk))
    return _merge_t(out_t), _merge(lse)


def _backward(
    chunk: int, q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
    d_out: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) for `_forward`'s inputs, recomputing each chunk's probabilities."""
    # Softmax backward's row term: sum_t p * dp = sum_d out * d_out.
    row_dot = jnp.sum(d_out * out, axis=-1)  # [G, N]
    k_t = k.swapaxes(1, 2)

    def body(
        carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        dk, dv = carry
        q_c, q_c_t, do_c, do_c_t, lse_c, row_c = xs
        # Transposed blocks [G, T, c]: keys on rows, so all five products below are row-major.
        p_t = jnp.exp(k @ q_c_t - lse_c[:, None, :])
        dv = dv + p_t @ do_c
        ds_t = p_t * (v @ do_c_t - row_c[:, None, :])
        dk = dk + ds_t @ q_c
        return (dk, dv), k_t @ ds_t  # dq^T of the chunk, [G, D, c]

    (dk, dv), dq_t = jax.lax.scan(
        body,
        (jnp.zeros_like(k), jnp.zeros_like(v)),
        (_split(q, chunk), _split_t(q, chunk), _split(d_out, chunk), _split_t(d_out, chunk),
         _split(lse, chunk), _split(row_dot, chunk)),
    )
    return _merge_t(dq_t), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, group_chunk: int) -> jax.Array:
    return _flash_fwd(q, k, v, chunk, group_chunk)[0]


def _flash_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, group_chunk: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    forward = functools.partial(_forward, chunk=chunk)
    out, lse = _per_group_chunk(forward, group_chunk, q, k, v)
    return out, (q, k, v, out, lse)


def _flash_bwd(
    chunk: int, group_chunk: int, residuals: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    backward = functools.partial(_backward, chunk)
    return _per_group_chunk(backward, group_chunk, *residuals, d_out)


_flash.defvjp(_flash_fwd, _flash_bwd)

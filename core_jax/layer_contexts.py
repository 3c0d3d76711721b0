"""A context per cross-attention layer (P+, arXiv 2303.09522): the U-Net's k-th cross-attention
layer (`attn2`, in the order `cross_attention_layers` lists them: down blocks, mid, up blocks)
reads the k-th of L contexts.

The U-Net is not changed for this. Its context argument carries the L contexts joined along the
token axis ([B, L T, D], `join_layers`), and within `per_layer_contexts`
(`flax.linen.intercept_methods`, as LoRA and Custom Diffusion reach the U-Net's layers) each
`attn2` call, found by its module path, keeps only its own T tokens. So the model and its parity
tests stay as they are, every U-Net (SD 1.x/2.x's 16 layers, SDXL's 70) takes it the same way,
and the step (`core_jax.train.passes`) and the sampler (`core_jax.sample`) share this one path.
The contexts travel as the U-Net's argument, not as values the interceptor closes over, so
gradients reach them through rematerialized blocks too (`core_jax.models.remat`'s custom VJP
passes no gradient to closed-over arrays).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import jax
import numpy as np
from flax import linen as nn

from core_jax.models.unet import cross_attention_stats

CROSS_ATTENTION = "attn2"


@functools.cache
def cross_attention_layers(unet: nn.Module) -> tuple[str, ...]:
    """The paths of `unet`'s cross-attention layers ("down_blocks_1/attentions_0/
    transformer_blocks_0", ...; diffusers' module names) in the order `cross_attention_stats`
    stacks their statistics. Found by tracing an init (`jax.eval_shape`: nothing computed)."""
    sown = jax.eval_shape(
        lambda: unet.init(jax.random.key(0), **unet.config.example_inputs()))["attn_stats"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(sown)
    # Each statistic replaced by its leaf number: cross_attention_stats says their order.
    numbered = jax.tree_util.tree_unflatten(
        treedef, [np.full(leaf.shape, k, np.int32) for k, (_, leaf) in enumerate(leaves)])
    order = np.asarray(cross_attention_stats({"attn_stats": numbered}))
    paths = []
    for k in order.reshape(len(order), -1)[:, 0]:
        keys = [entry.key for entry in leaves[k][0] if isinstance(entry, jax.tree_util.DictKey)]
        paths.append("/".join(keys[: keys.index("attn2")]))
    return tuple(paths)


@flax.struct.dataclass
class TimestepVectors:
    """S*'s vectors as a function of the timestep (NeTI's mapper), for the sampler: `value` is
    one run's group value (a pytree, a jit argument), `vectors` its group's
    `ParamGroup.timestep_vectors` and `bypass` its `ParamGroup.bypass` (static)."""

    value: Any
    vectors: Any = flax.struct.field(pytree_node=False)
    bypass: Any = flax.struct.field(pytree_node=False, default=None)
    # NeTI's inference truncation (the code's `truncation_idx`): an int32 scalar k, the mapper's
    # hidden units from k on zeroed; None: none. An argument, so each k reuses the program.
    truncation: Any = None


def join_layers(contexts: jax.Array) -> jax.Array:
    """[L, B, T, D] per-layer contexts -> [B, L T, D], the U-Net's context argument within
    `per_layer_contexts`: layer k's tokens at positions k T .. (k + 1) T - 1."""
    num_layers, batch, tokens, dim = contexts.shape
    return contexts.transpose(1, 0, 2, 3).reshape(batch, num_layers * tokens, dim)


@contextlib.contextmanager
def per_layer_contexts(layers: Sequence[str], values_apart: bool = False) -> Iterator[None]:
    """U-Net calls traced inside the block give cross-attention layer `layers[k]` (a path such
    as "down_blocks_0/attentions_0/transformer_blocks_0") the k-th T tokens of their context
    [B, L T, D] (`join_layers`), L = len(layers). With `values_apart` the context carries 2 L
    encodings [B, 2 L T, D]: layer k's keys read the k-th, its values (`to_v`) the (L + k)-th
    (NeTI's textual bypass reaches the values only). Raises ValueError on leaving the block if
    a U-Net call inside it had a cross-attention layer not in `layers`, or lacked one of them."""
    index = {(*path.split("/"), CROSS_ATTENTION): k for k, path in enumerate(layers)}
    seen: set[int] = set()
    unknown: list[str] = []
    parts = 2 if values_apart else 1
    values: dict[tuple[str, ...], jax.Array] = {}  # attn2 path -> its values' context, in call

    def own_context(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if values_apart and module.name == "to_v" and tuple(module.path[:-1]) in values:
            return next_fun(values[tuple(module.path[:-1])], *args[1:], **kwargs)
        if module.name != CROSS_ATTENTION:
            return next_fun(*args, **kwargs)
        k = index.get(tuple(module.path))
        if k is None:
            unknown.append("/".join(module.path))
            return next_fun(*args, **kwargs)
        seen.add(k)
        x, joined = args  # attn2(hidden states [B, N, C], joined contexts [B, parts L T, D])
        if joined.shape[1] % (parts * len(layers)):
            raise ValueError(f"a context of {joined.shape[1]} tokens is no join of "
                             f"{parts * len(layers)} contexts")
        tokens = joined.shape[1] // (parts * len(layers))
        if not values_apart:
            return next_fun(x, joined[:, k * tokens:(k + 1) * tokens], **kwargs)
        path = tuple(module.path)
        start = (len(layers) + k) * tokens
        values[path] = joined[:, start:start + tokens]
        try:
            return next_fun(x, joined[:, k * tokens:(k + 1) * tokens], **kwargs)
        finally:
            del values[path]

    with nn.intercept_methods(own_context):
        yield
    if unknown:
        raise ValueError(f"cross-attention layers {unknown[:3]} have no context of their own")
    if seen and len(seen) != len(layers):
        missing = [layers[k] for k in range(len(layers)) if k not in seen]
        raise ValueError(f"the U-Net has no cross-attention layers {missing[:3]}")

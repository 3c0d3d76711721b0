"""The learned vectors of S* enter the text encoder here, and only here: the training step, the
sampler and the exports' checks all encode through `encode_with_learned`.

The vectors live outside the vocabulary (DESIGN.md, performance principle 1): the placeholder
tokens have ids beyond the frozen table, and their positions take the learned vectors instead
of a table row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def placeholder_slots(ids: Any, placeholder_ids: Sequence[int]) -> tuple[Any, Any]:
    """Which positions of ``ids`` are placeholders, and which of the V vectors each one takes.

    Returns (mask, slot), both shaped like ids: mask is bool, slot is int32 in [0, V), 0 where
    mask is False so it is always a valid gather index. NumPy in, NumPy out (prompts prepared on
    the host); traced arrays in, traced arrays out (inside a step).
    """
    xp = np if isinstance(ids, np.ndarray) else jnp
    hits = ids[..., None] == xp.asarray(placeholder_ids, dtype=ids.dtype)
    return hits.any(-1), hits.argmax(-1).astype(xp.int32)


def encode_with_learned(
    text_encoder: nn.Module,
    text_params: Any,
    ids: jax.Array,
    learned: jax.Array | None,
    slots: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Last hidden state [R, T, D] of ids [R, T] with the learned vectors injected.

    `learned` is [V, D] (every row's concept) or [R, V, D] (a concept per row); `slots` is
    `placeholder_slots(ids, placeholder_ids)`. Without learned vectors the ids are encoded as
    they are.
    """
    if learned is None:
        return text_encoder.apply({"params": text_params}, ids).last_hidden_state
    mask, slot = slots
    if learned.ndim == 2:
        learned = jnp.broadcast_to(learned, (ids.shape[0],) + learned.shape)
    vectors = jnp.take_along_axis(learned, slot[..., None], axis=1)  # [R, T, D]
    return text_encoder.apply(
        {"params": text_params}, ids, inject_embeds=vectors, inject_mask=mask
    ).last_hidden_state


def encode_per_layer(
    text_encoder: nn.Module,
    text_params: Any,
    ids: jax.Array,
    learned: jax.Array,
    slots: tuple[jax.Array, jax.Array],
) -> jax.Array:
    """Last hidden states [L, R, T, D] of ids [R, T] with per-layer learned vectors (P+):
    `learned` [L, V, D] (every row's concept) or [R, L, V, D] (a concept per row); layer k's
    encoding takes vectors k. One encoder call over L x R rows."""
    num_rows = ids.shape[0]
    if learned.ndim == 3:
        learned = jnp.broadcast_to(learned, (num_rows,) + learned.shape)
    num_layers = learned.shape[1]
    per_layer = jnp.swapaxes(learned, 0, 1).reshape((num_layers * num_rows,) + learned.shape[2:])
    mask, slot = slots
    tile = lambda a: jnp.tile(a, (num_layers, 1))  # noqa: E731  [R, T] -> [L R, T], layer-major
    hidden = encode_with_learned(text_encoder, text_params, tile(ids), per_layer,
                                 (tile(mask), tile(slot)))
    return hidden.reshape((num_layers, num_rows) + hidden.shape[1:])


def encode_per_layer_with_bypass(
    text_encoder: nn.Module,
    text_params: Any,
    ids: jax.Array,
    learned: jax.Array,
    slots: tuple[jax.Array, jax.Array],
    bypass: jax.Array | None = None,
    shift: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """`encode_per_layer` for a concept per row, [R, L, T, D] from ids [R, T] and `learned`
    [R, L, V, D], and, with `bypass` [R, L, V, D], a second encoding from the same encoder
    call: at the placeholder positions the states before the final layer norm become
    `shift(states, bypass vector)` (NeTI's textual bypass), then the final layer norm.
    Returns (encodings, bypassed encodings or None)."""
    num_rows, num_layers = learned.shape[:2]
    flat = lambda a: a.reshape((num_rows * num_layers,) + a.shape[2:])  # noqa: E731
    mask, slot = slots
    per_row = lambda a: flat(jnp.broadcast_to(  # noqa: E731
        a[:, None], (num_rows, num_layers) + a.shape[1:]))  # [R, T] -> [R L, T], row-major
    ids, mask, slot = per_row(ids), per_row(mask), per_row(slot)
    vectors = jnp.take_along_axis(flat(learned), slot[..., None], axis=1)  # [R L, T, D]
    out = text_encoder.apply({"params": text_params}, ids, inject_embeds=vectors,
                             inject_mask=mask, output_hidden_states=bypass is not None)
    unflat = lambda a: a.reshape((num_rows, num_layers) + a.shape[1:])  # noqa: E731
    if bypass is None:
        return unflat(out.last_hidden_state), None
    states = out.hidden_states[-1]  # the encoder's output, before the final layer norm
    shifted = jnp.take_along_axis(flat(bypass), slot[..., None], axis=1)
    states = jnp.where(mask[..., None], shift(states, shifted), states)
    final_norm = nn.LayerNorm(epsilon=text_encoder.config.layer_norm_eps,
                              dtype=text_encoder.dtype)
    bypassed = final_norm.apply({"params": text_params["text_model"]["final_layer_norm"]},
                                states)
    return unflat(out.last_hidden_state), unflat(bypassed)


def second_encoder_ids(ids: jax.Array, eos_token_id: int, pad_id_2: int) -> jax.Array:
    """SDXL's second tokenizer's ids from the first's: the same tokens up to the first
    end-of-text, its own padding after it (tokenizer 1 pads with end-of-text, tokenizer 2 with
    "!")."""
    first_eos = jnp.argmax(ids == eos_token_id, axis=-1)[..., None]
    return jnp.where(jnp.arange(ids.shape[-1]) > first_eos, pad_id_2, ids).astype(ids.dtype)


def encode_sdxl_with_learned(
    text_encoder: nn.Module,
    text_encoder_2: nn.Module,
    params: Any,
    ids: jax.Array,
    ids_2: jax.Array,
    learned: jax.Array | None,
    slots: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SDXL's context [R, T, D1 + D2] (both encoders' penultimate states side by side) and
    pooled text embedding [R, P] (encoder 2's projection) of ids [R, T] (tokenizer 1's) and
    ids_2 (tokenizer 2's: the same tokens, its own padding). `params` holds "text" and
    "text_2"; `learned` [V, D1 + D2] or [R, V, D1 + D2], encoder 1's part first, takes the
    placeholder positions of both."""
    width = text_encoder.config.hidden_size
    inject_1 = inject_2 = {}
    if learned is not None:
        mask, slot = slots
        if learned.ndim == 2:
            learned = jnp.broadcast_to(learned, (ids.shape[0],) + learned.shape)
        vectors = jnp.take_along_axis(learned, slot[..., None], axis=1)  # [R, T, D1 + D2]
        inject_1 = {"inject_embeds": vectors[..., :width], "inject_mask": mask}
        inject_2 = {"inject_embeds": vectors[..., width:], "inject_mask": mask}
    first = text_encoder.apply({"params": params["text"]}, ids, output_hidden_states=True,
                               **inject_1)
    second, pooled = text_encoder_2.apply({"params": params["text_2"]}, ids_2,
                                          output_hidden_states=True, **inject_2)
    context = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
    return context, pooled

"""Context drift of a learned word on held-out prompts: is the failure CoRe corrects there?

A learned word S* "drowns the context" when, in a prompt like "a small S* on grass", the text
encoder's outputs at the context tokens move away from what they are with the super-category
word ("a small star on grass"), and when the U-Net's cross-attention goes to S* at the cost of
the context. For one finished run, on prompts that are no regularization template, this
measures:

- emb: CoRe's L_emb (`losses.core_embedding_loss`, the paper's variant) between y* and y_cat
  on their aligned context tokens (0 when the learned vector leaves the context as the word
  does);
- attn: CoRe's L_attn (`losses.core_attention_loss`) between the two prompts' per-token
  cross-attention statistics (the U-Net sows them), on the concept's photo noised at a few
  timesteps, the same noise for both prompts;
- token_share: the share of cross-attention the learned token takes (the sown per-token mean
  attention summed over the placeholder's positions, averaged over layers: each query's
  probabilities sum to 1, so the share is in [0, 1]), and super_category_share, the same for
  the super-category word in y_cat: the yardstick of what a word normally takes.

Each is the mean over prompts (and timesteps); `per_prompt` keeps the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.diffusion.schedule import add_noise
from core_jax.losses import core_attention_loss, core_embedding_loss
from core_jax.models.pixel import with_coordinates
from core_jax.models.unet import cross_attention_stats
from core_jax.text.context import regularization_prompts
from core_jax.text.inject import encode_with_learned, placeholder_slots
from core_jax.text.tokenizer import placeholder_string

DRIFT_TIMESTEPS = (250, 500, 750)  # of the 1000 training timesteps: coarse to fine


def _gather(values: jax.Array, index: np.ndarray, axis: int) -> jax.Array:
    """values [..., N, T, ...] at the aligned positions index [N, T] along the token axis."""
    shape = [1] * values.ndim
    shape[axis - 1], shape[axis] = index.shape
    return jnp.take_along_axis(values, jnp.asarray(index).reshape(shape), axis=axis)


def _concept_positions(ids: np.ndarray, index: np.ndarray, mask: np.ndarray,
                       eos_id: int) -> np.ndarray:
    """[N, T] bool: the positions before the first end-of-text that are no context token
    (the concept's tokens)."""
    out = np.zeros(ids.shape, bool)
    for row in range(ids.shape[0]):
        end = list(ids[row]).index(eos_id)
        out[row, :end] = True
        out[row, index[row][mask[row]]] = False
    return out


class DriftProbe:
    """`context_drift` for many runs of one model: the text encoder and the U-Net are compiled
    once per prompt count (the learned vectors are arguments). `pipeline` is a
    `sample.Pipeline` (its tokenizer holds the placeholder)."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        encoder, unet = pipeline.text_encoder, pipeline.unet
        in_channels = unet.config.in_channels

        def encode(text_params: Any, ids: jax.Array, learned: jax.Array | None,
                   slots: tuple[jax.Array, jax.Array] | None) -> jax.Array:
            return encode_with_learned(encoder, text_params, ids, learned, slots)

        def stats(unet_params: Any, x_t: jax.Array, t: jax.Array,
                  context: jax.Array) -> jax.Array:  # [L, N, T]
            _, sown = unet.apply({"params": unet_params}, with_coordinates(x_t, in_channels), t,
                                 context, mutable=["attn_stats"])
            return cross_attention_stats(sown)

        self._encode = jax.jit(encode)
        self._stats = jax.jit(stats)

    def __call__(
        self,
        learned: jax.Array,
        templates: Sequence[str],
        super_category: str,
        photo: np.ndarray,
        seed: int = 0,
        timesteps: Sequence[int] = DRIFT_TIMESTEPS,
        unet_params: Any = None,
    ) -> dict[str, Any]:
        """emb, attn, token_share and super_category_share (see the module) of the learned
        vectors [V, D] on `templates` ("a small {} on grass", "{}" for the concept), with the
        concept's `photo` (uint8 [H, W, 3]) noised at `timesteps`; `unet_params`: a run's own
        U-Net (stage 2), else the pipeline's."""
        pipeline = self.pipeline
        unet_params = pipeline.unet_params if unet_params is None else unet_params
        tokenizer = pipeline.tokenizer
        word = placeholder_string(pipeline.placeholder, len(pipeline.placeholder_ids))
        prompts = regularization_prompts(tokenizer, list(templates), word, super_category)
        n = len(prompts)
        mask = jnp.asarray(prompts.context_mask)
        slots = placeholder_slots(jnp.asarray(prompts.obj_ids),
                                  jnp.asarray(pipeline.placeholder_ids))
        h_obj = self._encode(pipeline.text_params, jnp.asarray(prompts.obj_ids),
                             jnp.asarray(learned, jnp.float32), slots)
        h_cat = self._encode(pipeline.text_params, jnp.asarray(prompts.cat_ids), None, None)
        obj_aligned = _gather(h_obj, prompts.obj_index, 1)
        cat_aligned = _gather(h_cat, prompts.cat_index, 1)
        emb = [float(core_embedding_loss(obj_aligned[i : i + 1], cat_aligned[i : i + 1],
                                         mask[i : i + 1])) for i in range(n)]

        x0 = jnp.broadcast_to(jnp.asarray(photo, jnp.float32) / 127.5 - 1.0, (n, *photo.shape))
        key = jax.random.key(seed)
        concept_obj = jnp.asarray(np.asarray(slots[0], bool))
        concept_cat = jnp.asarray(_concept_positions(
            prompts.cat_ids, prompts.cat_index, prompts.context_mask, tokenizer.eos_token_id))
        attn, share, share_cat = [], [], []
        for t_value in timesteps:
            key, sub = jax.random.split(key)
            t = jnp.full((n,), t_value, jnp.int32)
            x_t = add_noise(pipeline.schedule, x0, jax.random.normal(sub, x0.shape), t)
            s_obj = self._stats(unet_params, x_t, t, h_obj)
            s_cat = self._stats(unet_params, x_t, t, h_cat)
            a_obj = _gather(s_obj, prompts.obj_index, 2)
            a_cat = _gather(s_cat, prompts.cat_index, 2)
            attn.append([float(core_attention_loss(a_obj[:, i : i + 1], a_cat[:, i : i + 1],
                                                   mask[i : i + 1])) for i in range(n)])
            share.append(np.asarray(jnp.where(concept_obj, s_obj.mean(0), 0.0).sum(-1)))
            share_cat.append(np.asarray(jnp.where(concept_cat, s_cat.mean(0), 0.0).sum(-1)))
        attn_rows = np.mean(attn, axis=0)
        share_rows, share_cat_rows = np.mean(share, axis=0), np.mean(share_cat, axis=0)
        per_prompt = {
            template: {"emb": emb[i], "attn": float(attn_rows[i]),
                       "token_share": float(share_rows[i]),
                       "super_category_share": float(share_cat_rows[i])}
            for i, template in enumerate(templates)
        }
        return {
            "emb": float(np.mean(emb)), "attn": float(attn_rows.mean()),
            "token_share": float(share_rows.mean()),
            "super_category_share": float(share_cat_rows.mean()),
            "timesteps": list(timesteps), "per_prompt": per_prompt,
        }

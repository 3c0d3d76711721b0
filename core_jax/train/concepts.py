"""Per-concept constants of stage 1: prompt tables, cached super-category encodings, latents."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from transformers import CLIPTokenizer

from core_jax.errors import InputError
from core_jax.text import (
    CLASS_FIELD,
    encode_sdxl_with_learned,
    regularization_prompts,
    second_encoder_ids,
    super_category_ids,
    tokenize,
)
from core_jax.train.state import ConceptData

# The phrases ClassDiffusion's semantic preservation loss compares (its code's, fixed): the
# concept's phrase with S* and the class word, and the class word's alone.
SEMANTIC_PHRASES = ("a photo of a {} {cls}", "a photo of a {cls}")


# TextBoost's prior prompts: general captions (most of the draws), the concept's class in the
# regularization templates and the empty prompt (10 % of the draws each, as its code's
# `null_prob` and class templates).
GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "text" / "general_prompts.txt"
KNOWLEDGE_SHARES = {"general": 0.8, "class": 0.1, "empty": 0.1}


def knowledge_prompts(
    super_category: str, templates: Sequence[str], general: Sequence[str] | None = None
) -> tuple[list[str], list[float]]:
    """The prompts TextBoost's knowledge-preservation loss draws from, and the probability of
    each: `general` captions (default: the shipped `general_prompts.txt`), the templates with
    the class word for S*, and "" (`KNOWLEDGE_SHARES`)."""
    if general is None:
        general = [line.strip() for line in GENERAL_PROMPTS.read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    classes = [t.replace("{}", super_category) for t in templates]
    prompts = [*general, *classes, ""]
    weights = ([KNOWLEDGE_SHARES["general"] / len(general)] * len(general)
               + [KNOWLEDGE_SHARES["class"] / len(classes)] * len(classes)
               + [KNOWLEDGE_SHARES["empty"]])
    return prompts, weights


class LatentPool(NamedTuple):
    """A concept's encoded views: scaled latent mean and std [P, h, w, 4], for views with object
    masks (`core_jax.train.setup.masked_latent_pool`) those [P, h, w, 1], and each view's SDXL
    add-time ids [P, 6] (original size, crop top-left, target size) where the pool knows them.
    A plain (mean, std) or (mean, std, mask) tuple reads as one."""

    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray | None = None
    time_ids: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """One concept of a run: what it is called, what it is, which templates regularize it."""

    name: str
    super_category: str
    templates: tuple[str, ...]
    seed: int = 0
    init_word: str = ""  # where S* starts; "" = the super-category


def super_category_embedding(
    tokenizer: CLIPTokenizer, text_params: dict[str, Any], word: str
) -> np.ndarray:
    """Mean input embedding [D] of the word's tokens (one token for most words)."""
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    return np.asarray(table)[super_category_ids(tokenizer, word)].mean(axis=0)


def build_concept_data(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    text_params: dict[str, Any],
    placeholder_text: str,
    specs: Sequence[ConceptSpec],
    latent_pools: Sequence[LatentPool | tuple[np.ndarray, ...]],
    *,
    text_encoder_2: nn.Module | None = None,
    text_2_params: dict[str, Any] | None = None,
    pad_id_2: int = 0,
    class_pools: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    class_prompts: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    with_phrases: bool = False,
    knowledge: Sequence[tuple[Sequence[str], Sequence[float]]] | None = None,
    target_prompts: Sequence[str] | None = None,
) -> ConceptData:
    """Stack C concepts' tables; templates are padded to the longest set (padding never drawn).

    `latent_pools[c]`: the concept's encoded views (`LatentPool`). The y_cat encodings are
    computed here, once, with the frozen encoder. SDXL (a second encoder, whose tokenizer pads
    with `pad_id_2`): y_cat's context is both encoders' as the U-Net reads it, its pooled
    embeddings are kept, the super-category's input embedding is both tables' side by side
    [D1 + D2], as the learned vectors are, and every pool must carry its views' add-time ids. For
    prior preservation, `class_pools[c]` (mean, std) [Q, h, w, 4] are the concept's generated
    class images and `class_prompts[c]` the prompt they came from ("a photo of a dog"), encoded
    here once; `captions[c]`: each concept's own caption, when the caption names the class;
    `with_phrases`: each concept's `SEMANTIC_PHRASES` (ClassDiffusion's loss reads them);
    `knowledge[c]`: the concept's prior prompts and their probabilities (`knowledge_prompts`),
    encoded here once by the frozen encoder (TextBoost; SD 1.x/2.x); `target_prompts[c]`: the
    run's clean target prompt (PALP), encoded here once by the frozen encoder with the empty
    prompt beside it (SD 1.x/2.x).
    """
    latent_pools = [LatentPool(*pool) for pool in latent_pools]
    with_masks = {pool.mask is not None for pool in latent_pools}
    if len(with_masks) > 1:
        raise ValueError("latent pools of one pack must all have view masks or none")
    if text_encoder_2 is not None and any(pool.time_ids is None for pool in latent_pools):
        raise ValueError("SDXL's concept data needs each view's add-time ids "
                         "(LatentPool.time_ids)")
    prompts = [
        regularization_prompts(tokenizer, s.templates, placeholder_text, s.super_category)
        for s in specs
    ]
    n_max = max(len(p) for p in prompts)

    def stack(field: str) -> np.ndarray:
        return np.stack([np.resize(getattr(p, field), (n_max,) + getattr(p, field).shape[1:])
                         for p in prompts])

    cat_ids = stack("cat_ids")  # [C, N, T]
    cat_pooled = time_ids = None

    def input_embedding(word: str) -> np.ndarray:  # [D], SDXL [D1 + D2]
        embedding = super_category_embedding(tokenizer, text_params, word)
        if text_encoder_2 is None:
            return embedding
        return np.concatenate([embedding,
                               super_category_embedding(tokenizer, text_2_params, word)])

    # The weights are arguments, not constants closed over: a closure would embed them in the
    # program (3 GB at SDXL's size) and make XLA constant-fold them.
    encode_jit = jax.jit(
        lambda params, ids: text_encoder.apply({"params": params}, ids).last_hidden_state)

    def encode(ids: jax.Array) -> jax.Array:  # [R, T] -> [R, T, D]
        return encode_jit(text_params, ids)

    if text_encoder_2 is None:
        cat_hidden = np.stack([np.asarray(encode(jnp.asarray(ids))) for ids in cat_ids])
    else:
        if class_pools is not None:
            raise InputError("prior preservation on SDXL is not built yet (its class pass "
                             "needs the pooled embedding); use an SD 1.x/2.x model")
        frozen = {"text": text_params, "text_2": text_2_params}
        encode_sdxl = jax.jit(lambda params, ids: encode_sdxl_with_learned(
            text_encoder, text_encoder_2, params, ids,
            second_encoder_ids(ids, tokenizer.eos_token_id, pad_id_2), None))
        encoded = [jax.device_get(encode_sdxl(frozen, jnp.asarray(ids))) for ids in cat_ids]
        cat_hidden = np.stack([h for h, _ in encoded])
        cat_pooled = jnp.asarray(np.stack([e for _, e in encoded]))
        time_ids = jnp.asarray(np.stack([pool.time_ids for pool in latent_pools]), jnp.float32)
    optional = {}
    if class_pools is not None:
        class_hidden = encode(jnp.asarray(tokenize(tokenizer, list(class_prompts))))
        optional = dict(
            class_mean=jnp.asarray(np.stack([m for m, _ in class_pools]), jnp.float32),
            class_std=jnp.asarray(np.stack([s for _, s in class_pools]), jnp.float32),
            class_hidden=jnp.asarray(class_hidden),
        )
    if captions is not None:
        optional["caption_ids"] = jnp.asarray(tokenize(tokenizer, list(captions)))
    if with_phrases:
        optional["phrase_ids"] = jnp.asarray(np.stack([
            tokenize(tokenizer, [p.replace(CLASS_FIELD, s.super_category)
                                 .replace("{}", placeholder_text) for p in SEMANTIC_PHRASES])
            for s in specs
        ]))
    if knowledge is not None:
        if text_encoder_2 is not None:
            raise InputError("TextBoost's knowledge preservation is built for one text encoder "
                             "(SD 1.x/2.x), not SDXL")
        size = max(len(prompts) for prompts, _ in knowledge)  # padded with "", never drawn
        kp_ids = [tokenize(tokenizer, [*prompts, *[""] * (size - len(prompts))])
                  for prompts, _ in knowledge]
        kp_weights = [np.pad(np.asarray(w, np.float32), (0, size - len(w)))
                      for _, w in knowledge]
        optional.update(
            kp_ids=jnp.asarray(np.stack(kp_ids)),
            kp_frozen=jnp.asarray(np.stack([np.asarray(encode(jnp.asarray(i))) for i in kp_ids])),
            kp_weights=jnp.asarray(np.stack(kp_weights)),
        )
    if target_prompts is not None:
        if text_encoder_2 is not None:
            raise InputError("PALP's teacher passes are built for one text encoder (SD 1.x/2.x), "
                             "not SDXL (its U-Net also reads pooled embeddings)")
        target_hidden = encode(jnp.asarray(tokenize(tokenizer, list(target_prompts))))
        null_hidden = encode(jnp.asarray(tokenize(tokenizer, [""])))
        optional.update(
            target_hidden=jnp.asarray(target_hidden),
            null_hidden=jnp.asarray(jnp.broadcast_to(null_hidden, target_hidden.shape)),
        )
    if any(s.init_word for s in specs):
        optional["init_embed"] = jnp.asarray(np.stack([
            input_embedding(s.init_word or s.super_category) for s in specs
        ]))
    return ConceptData(
        latent_mean=jnp.asarray(np.stack([pool.mean for pool in latent_pools]), jnp.float32),
        latent_std=jnp.asarray(np.stack([pool.std for pool in latent_pools]), jnp.float32),
        latent_mask=(jnp.asarray(np.stack([pool.mask for pool in latent_pools]), bool)
                     if with_masks == {True} else None),
        obj_ids=jnp.asarray(stack("obj_ids")),
        obj_index=jnp.asarray(stack("obj_index")),
        cat_index=jnp.asarray(stack("cat_index")),
        context_mask=jnp.asarray(stack("context_mask")),
        cat_hidden=jnp.asarray(cat_hidden),
        num_templates=jnp.asarray([len(p) for p in prompts], jnp.int32),
        super_embed=jnp.asarray(np.stack([input_embedding(s.super_category) for s in specs])),
        cat_pooled=cat_pooled,
        time_ids=time_ids,
        **optional,
    )

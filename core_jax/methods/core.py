"""CoRe (Wu et al., arXiv 2408.15914): context regularization of the learned word.

Added to a method that trains the vectors of S* (textual_inversion):
- L_emb: the text encoder's outputs at the context tokens of y* ("... S* ...") should equal
  those of y_cat ("... <super-category> ..."): 1 - cosine, averaged over context tokens.
- L_attn: the cross-attention each context token receives, averaged over heads and positions,
  should be the same with y* as with y_cat (same noisy latents and timesteps; y_cat constant).
- the norm hold: after each update in steps [rescale_start, rescale_end] the vectors keep the
  norm they had at rescale_start.
Paper and official code differ in both losses; `emb_variant` / `attn_variant` pick ("paper":
cosine over features, layer-mean then MSE; "code": cosine over tokens, per-layer squared
difference summed over the batch). DESIGN.md ("CoRe, exactly") is the source of every number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core_jax import losses
from core_jax.methods.base import Hook, Method, Settings, Term

VARIANTS = ("paper", "code")

DEFAULTS = {
    # Tuned by the authors with the code's variants. With the paper's attention variant (batch
    # mean) the same lambda_attn is batch_size times weaker than the code's batch sum.
    "lambda_emb": 1.5e-4,
    "lambda_attn": 0.05,
    "emb_variant": "paper",
    "attn_variant": "paper",
    "rescale_start": 120,  # hold the vectors' norm from this step (of the stage) ...
    "rescale_end": 180,  # ... through this one; 0 = never
}


def _terms(settings: Settings) -> tuple[Term, ...]:
    emb_variant, attn_variant = settings.stage["emb_variant"], settings.stage["attn_variant"]

    def emb(obj: jax.Array, cat: jax.Array, mask: jax.Array, numbers) -> jax.Array:
        # obj, cat [T, D] context-aligned encodings; mask [T]
        return losses.core_embedding_loss(obj[None], cat[None], mask[None], emb_variant)

    def attn(obj: jax.Array, cat: jax.Array, mask: jax.Array, shards: jax.Array, numbers):
        # obj, cat [L, b, T] per-token attention means of the concept's local rows
        loss = losses.core_attention_loss(obj, cat, jnp.broadcast_to(mask, obj.shape[1:]),
                                          attn_variant)
        # The code's batch sum over the local rows, after the mean over data shards, is the
        # global sum divided by the shard count.
        return loss * shards if attn_variant == "code" else loss

    return (
        Term("emb", ("obj_aligned", "cat_aligned", "context_mask"), emb, weight="lambda_emb"),
        Term("attn", ("obj_stats", "cat_stats", "context_mask", "data_shards"), attn,
             weight="lambda_attn"),
    )


def _hooks(settings: Settings) -> tuple[Hook, ...]:
    start, end = settings.stage["rescale_start"], settings.stage["rescale_end"]
    if not end:
        return ()

    def init(params: dict) -> jax.Array:
        return jnp.linalg.norm(params["embeds"], axis=-1)  # [V]

    def hold(params: dict, ref_norm: jax.Array, step: jax.Array, numbers):
        norms = jnp.linalg.norm(params["embeds"], axis=-1)
        ref_norm = jnp.where(step == start, norms, ref_norm)
        holding = (step > start) & (step <= end)
        embeds = jnp.where(holding, losses.rescale_to_norm(params["embeds"], ref_norm),
                           params["embeds"])
        return {**params, "embeds": embeds}, ref_norm

    return (Hook("norm_hold", init, hold),)


METHOD = Method(
    name="core",
    summary="CoRe's context regularizers L_emb and L_attn and the norm hold (arXiv 2408.15914)",
    defaults=DEFAULTS,
    source="arXiv 2408.15914 and its official code; shared/DESIGN.md 'CoRe, exactly'",
    numbers=("lambda_emb", "lambda_attn"),
    choices={"emb_variant": VARIANTS, "attn_variant": VARIANTS},
    needs_trained=("embeds",),
    terms=_terms,
    hooks=_hooks,
)

# CoRe's test-time optimization (`core_jax.tto`): S*'s vectors move under the regularizers of
# the stage's other methods only. Listed with "core", it is the paper's TTO stage.
TEST_TIME = Method(
    name="test_time",
    summary="train S*'s vectors with no diffusion loss (with core: CoRe's test-time optimization)",
    defaults={},
    source="arXiv 2408.15914 (test-time optimization); shared/DESIGN.md 'CoRe, exactly'",
    trains={"embeds": "learning_rate"},
)

METHODS = (METHOD, TEST_TIME)

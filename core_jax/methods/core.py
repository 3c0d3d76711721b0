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

Two choices the paper leaves open (it has one text encoder and uses every layer):
- `emb_encoders`, for a context made of two encoders' states (SDXL): "joined" (L_emb of the
  concatenated [D1 + D2] vectors, the context as the U-Net reads it), "mean" (the mean of each
  encoder's own L_emb), "clip_l" / "clip_g" (only the first / second encoder's). With one
  encoder "joined" and "mean" are the same; "clip_l" / "clip_g" need two
  (`core_jax.losses.encoders_embedding_loss`).
- `attn_layers`, which cross-attention layers L_attn averages: "all" (the paper), or a comma
  list of any of "down", "mid", "up" (those blocks' layers), layer numbers counted from 0 in
  the U-Net's order (down blocks, mid, up blocks; 16 layers in SD 1.x/2.x, 70 in SDXL base),
  and paths of diffusers' module names ("up_blocks_0", "up_blocks_0/attentions_1",
  "mid_block/attentions_0/transformer_blocks_0"), e.g. "mid,up" or "0,1,2".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from core_jax import losses
from core_jax.errors import InputError
from core_jax.methods.base import Hook, Method, Settings, Term

VARIANTS = ("paper", "code")
ALL_LAYERS = "all"
_BLOCK_PREFIXES = {"down": "down_blocks_", "mid": "mid_block", "up": "up_blocks_"}

DEFAULTS = {
    # Tuned by the authors with the code's variants. With the paper's attention variant (batch
    # mean) the same lambda_attn is batch_size times weaker than the code's batch sum.
    "lambda_emb": 1.5e-4,
    "lambda_attn": 0.05,
    "emb_variant": "paper",
    "attn_variant": "paper",
    "emb_encoders": "joined",  # L_emb on SDXL's two encoders (see above)
    "attn_layers": ALL_LAYERS,  # the cross-attention layers L_attn averages (see above)
    "rescale_start": 120,  # hold the vectors' norm from this step (of the stage) ...
    "rescale_end": 180,  # ... through this one; 0 = never
}


def attention_layer_indices(selection: str, layers: Sequence[str]) -> tuple[int, ...]:
    """The numbers of the cross-attention layers `selection` names (the `attn_layers` key: a
    comma list of "down", "mid", "up", layer numbers and module paths) among `layers` (their
    paths in the U-Net's order), ascending. Raises InputError for an empty selection or an
    item that names no layer."""
    items = [item.strip() for item in selection.split(",") if item.strip()]
    if not items:
        raise InputError(f"attn_layers {selection!r} names no layer; give 'all' or a comma list "
                         "of down, mid, up, layer numbers or paths")
    chosen: set[int] = set()
    for item in items:
        if item.isdigit():
            found = [int(item)] if int(item) < len(layers) else []
        else:
            prefix = _BLOCK_PREFIXES.get(item)
            found = [k for k, path in enumerate(layers)
                     if (path.startswith(prefix) if prefix else
                         path == item or path.startswith(item + "/"))]
        if not found:
            raise InputError(
                f"attn_layers item {item!r} names none of the U-Net's {len(layers)} "
                f"cross-attention layers; use down, mid, up, 0-{len(layers) - 1} or a path "
                f"such as {layers[-1]!r}")
        chosen.update(found)
    return tuple(sorted(chosen))


def _chosen_layers(settings: Settings) -> tuple[int, ...] | None:
    """The layer numbers L_attn averages; None: all of them."""
    selection = settings.stage["attn_layers"]
    if selection.strip() == ALL_LAYERS:
        return None
    if settings.attention_layers is None:
        raise ValueError("attn_layers other than 'all' needs the model's attention layers "
                         "(Settings.attention_layers)")
    return attention_layer_indices(selection, settings.attention_layers())


def _terms(settings: Settings) -> tuple[Term, ...]:
    emb_variant, attn_variant = settings.stage["emb_variant"], settings.stage["attn_variant"]
    encoders = settings.stage["emb_encoders"]
    widths = settings.encoder_widths
    if encoders in ("clip_l", "clip_g") and len(widths) != 2:
        raise InputError(f"emb_encoders={encoders!r} needs SDXL's two text encoders; this model "
                         "has one (use 'joined')")
    layers = _chosen_layers(settings)

    def emb(obj: jax.Array, cat: jax.Array, mask: jax.Array, numbers) -> jax.Array:
        # obj, cat [T, D] context-aligned encodings; mask [T]
        if encoders == "joined":
            return losses.core_embedding_loss(obj[None], cat[None], mask[None], emb_variant)
        return losses.encoders_embedding_loss(obj[None], cat[None], mask[None], widths,
                                              encoders, emb_variant)

    def attn(obj: jax.Array, cat: jax.Array, mask: jax.Array, shards: jax.Array, numbers):
        # obj, cat [L, b, T] per-token attention means of the concept's local rows
        if layers is not None:
            obj, cat = obj[jnp.asarray(layers)], cat[jnp.asarray(layers)]
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
    choices={"emb_variant": VARIANTS, "attn_variant": VARIANTS,
             "emb_encoders": losses.EMB_ENCODERS},
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

"""Losses and regularizers: pure functions on arrays with explicit masks.

Conventions shared by every function here:

* Masks are boolean, ``True`` = position takes part. Masked positions have no effect on values or
  gradients, whatever they hold (large values, inf, NaN): they are replaced by zeros *before* any
  nonlinearity, so no NaN can leak back through the VJP of a discarded branch.
* An example whose mask is empty contributes 0 and still counts in the batch mean.
* A vector with norm <= ``_EPS`` counts as the zero vector: its cosine with anything is 0, with
  zero gradient (no 1/eps blow-up).
* Arithmetic runs in at least float32, so bf16 activations give float32 losses.
* ``variant`` / ``prediction_type`` are static Python strings; everything else may be traced, so all
  functions jit and vmap. Nothing here applies ``stop_gradient``: constant targets (the
  super-category branch, the frozen encoder) are the caller's to stop.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_EPS = 1e-8

Variant = Literal["paper", "code"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def _float(x: ArrayLike) -> jax.Array:
    """Upcast to at least float32 (float64 stays float64 for x64 gradient checks)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _unit(x: ArrayLike, axis: int = -1) -> jax.Array:
    """``x / ||x||`` along ``axis``; 0, with zero gradient, where ``||x|| <= _EPS``."""
    x = _float(x)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    ok = sq > _EPS**2
    # The inner where keeps rsqrt off 0, so the discarded branch sends back no inf or NaN.
    return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def _cosine(a: ArrayLike, b: ArrayLike, axis: int = -1) -> jax.Array:
    """Cosine similarity along ``axis`` (inputs broadcast); 0 if either side is the zero vector."""
    return jnp.sum(_unit(a, axis) * _unit(b, axis), axis=axis)


def _mask_tokens(h: ArrayLike, mask: jax.Array) -> jax.Array:
    """Zero the masked token rows of ``h`` [..., T, D] (mask [..., T])."""
    return jnp.where(mask[..., None], _float(h), 0.0)


def _masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None) -> jax.Array:
    """Mean of ``x`` over ``axis`` where ``mask``; 0 (not 0/0) when nothing is selected."""
    mask = jnp.broadcast_to(mask, x.shape)
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def _check_variant(variant: str) -> None:
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")


def diffusion_loss(
    model_output: ArrayLike,
    target: ArrayLike,
    snr: ArrayLike | None = None,
    min_snr_gamma: float | None = None,
    prediction_type: PredictionType = "epsilon",
    mask: ArrayLike | None = None,
) -> jax.Array:
    """Denoising MSE, optionally Min-SNR weighted, optionally only where ``mask`` is set.

    Args:
      model_output, target: [B, ...] (target is epsilon, v or x0 to match ``prediction_type``).
      snr: [B] signal-to-noise ratio alpha_t^2 / sigma_t^2 of each example's timestep; used only
        with ``min_snr_gamma``.
      min_snr_gamma: gamma of Min-SNR weighting; ``None`` means unweighted.
      prediction_type: "epsilon", "v_prediction" or "sample" (diffusers' names).
      mask: boolean, broadcastable to ``model_output`` (e.g. [B, h, w, 1]: the object region of
        each latent, Custom Diffusion's masked loss); ``None``: every element counts.

    Returns:
      Scalar: mean over non-batch axes per example (over its masked elements, 0 for an empty
      mask), times its weight, mean over the batch. Prior preservation (DreamBooth) is this
      same loss on the class rows.
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    err = jnp.square(_float(model_output) - _float(target))
    axes = tuple(range(1, err.ndim))
    if mask is None:
        per_example = jnp.mean(err, axis=axes)
    else:
        per_example = _masked_mean(err, jnp.asarray(mask, bool), axes)
    if min_snr_gamma is None:
        return jnp.mean(per_example)
    if snr is None:
        raise ValueError("min_snr_gamma needs snr")
    snr = _float(snr)
    # Weights from Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy":
    # the x0-loss weight min(SNR, gamma) re-expressed for each parameterisation, i.e.
    # min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
    if prediction_type == "epsilon":
        # Written as min(1, gamma / SNR) so that SNR = 0 (zero-terminal-SNR schedules) gives the
        # limit 1 instead of 0/0.
        weight = jnp.minimum(1.0, min_snr_gamma / snr)
    elif prediction_type == "v_prediction":
        weight = jnp.minimum(snr, min_snr_gamma) / (snr + 1.0)
    else:
        weight = jnp.minimum(snr, min_snr_gamma)
    return jnp.mean(weight * per_example)


def core_embedding_loss(
    h_obj: ArrayLike,
    h_cat: ArrayLike,
    context_mask: ArrayLike,
    variant: Variant = "paper",
) -> jax.Array:
    """CoRe context-embedding regularizer L_emb.

    Args:
      h_obj, h_cat: [B, T, D] text-encoder outputs of y* and y_cat, aligned on context positions.
      context_mask: [B, T] bool, the context tokens.
      variant: "paper": per example, mean over context tokens of 1 - cos over features D.
        "code" (official CoRe code): per example and feature channel, cos between the two
        columns restricted to context tokens (cosine over the token axis); mean over channels of
        1 - cos.

    Returns:
      Scalar, mean over the batch.
    """
    _check_variant(variant)
    mask = jnp.asarray(context_mask, bool)
    h_obj, h_cat = _mask_tokens(h_obj, mask), _mask_tokens(h_cat, mask)
    if variant == "paper":
        per_example = _masked_mean(1.0 - _cosine(h_obj, h_cat, axis=-1), mask, axis=-1)
    else:
        # Zeroed non-context rows add nothing to the per-channel dot products or norms.
        per_channel = 1.0 - _cosine(h_obj, h_cat, axis=-2)
        per_example = jnp.where(jnp.any(mask, axis=-1), jnp.mean(per_channel, axis=-1), 0.0)
    return jnp.mean(per_example)


# How L_emb reads a context made of several text encoders' states side by side (SDXL: CLIP
# ViT-L's 768 features, then OpenCLIP bigG's 1280).
EMB_ENCODERS = ("joined", "mean", "clip_l", "clip_g")


def encoders_embedding_loss(
    h_obj: ArrayLike,
    h_cat: ArrayLike,
    context_mask: ArrayLike,
    widths: tuple[int, ...],
    encoders: str = "joined",
    variant: Variant = "paper",
) -> jax.Array:
    """`core_embedding_loss` on a context whose features are several encoders' side by side.

    Args:
      h_obj, h_cat, context_mask, variant: as `core_embedding_loss`; D = sum(widths).
      widths: each encoder's number of features, in the order they are joined.
      encoders: "joined": L_emb of the whole vectors (one cosine over all D features: the
        context as the U-Net reads it); "mean": the mean over encoders of each one's L_emb on
        its own features; "clip_l" / "clip_g": the first / second encoder's L_emb alone (SDXL:
        CLIP ViT-L / OpenCLIP bigG).

    Returns:
      Scalar.
    """
    if encoders not in EMB_ENCODERS:
        raise ValueError(f"encoders must be one of {EMB_ENCODERS}, got {encoders!r}")
    if sum(widths) != jnp.shape(h_obj)[-1]:
        raise ValueError(f"encoder widths {widths} do not add up to the {jnp.shape(h_obj)[-1]} "
                         "features of the context")
    if encoders == "joined":
        return core_embedding_loss(h_obj, h_cat, context_mask, variant)
    starts = [sum(widths[:k]) for k in range(len(widths))]
    parts = [(start, start + width) for start, width in zip(starts, widths, strict=True)]
    if encoders != "mean":
        if len(widths) != 2:
            raise ValueError(f"encoders={encoders!r} needs two text encoders (SDXL), got "
                             f"widths {widths}")
        parts = [parts[0 if encoders == "clip_l" else 1]]
    per_encoder = [core_embedding_loss(jnp.asarray(h_obj)[..., a:b], jnp.asarray(h_cat)[..., a:b],
                                       context_mask, variant) for a, b in parts]
    return jnp.mean(jnp.stack(per_encoder))


def core_attention_loss(
    stats_obj: ArrayLike,
    stats_cat: ArrayLike,
    context_mask: ArrayLike,
    variant: Variant = "paper",
) -> jax.Array:
    """CoRe context-attention regularizer L_attn.

    Args:
      stats_obj, stats_cat: [L, B, T] per cross-attention layer, mean attention probability of each
        token (over heads and spatial positions), for y* and y_cat on the same noisy latents.
      context_mask: [B, T] bool, the context tokens.
      variant: "paper": average over layers first, then per example mean over context tokens of
        the squared difference; mean over the batch.
        "code" (official CoRe code): squared difference per layer, mean over context tokens, mean
        over layers, SUMMED over the batch, so at equal per-example terms it is B times "paper"
        (the authors' lambda_attn = 0.05 was tuned with this sum at batch 6).

    Returns:
      Scalar.
    """
    _check_variant(variant)
    mask = jnp.asarray(context_mask, bool)
    obj, cat = _float(stats_obj), _float(stats_cat)
    if variant == "paper":
        diff = jnp.where(mask, jnp.mean(obj, axis=0) - jnp.mean(cat, axis=0), 0.0)
        return jnp.mean(_masked_mean(jnp.square(diff), mask, axis=-1))
    diff = jnp.where(mask, obj - cat, 0.0)
    per_layer = _masked_mean(jnp.square(diff), mask, axis=-1)
    return jnp.sum(jnp.mean(per_layer, axis=0))


def pairwise_loss(h_obj: ArrayLike, h_cat: ArrayLike, context_mask: ArrayLike) -> jax.Array:
    """Thesis pairwise regularizer: keep the token-token cosine structure of the context.

    Per example, S[i, j] = cos(h[i], h[j]) for y* and y_cat; L1 mean of |S_obj - S_cat| over pairs
    with both tokens in context (diagonal included: it is 1 on both sides, so it only sets the
    denominator to n^2).

    Args:
      h_obj, h_cat: [B, T, D] text-encoder outputs, aligned on context positions.
      context_mask: [B, T] bool.

    Returns:
      Scalar, mean over the batch.
    """
    mask = jnp.asarray(context_mask, bool)

    def gram(h: ArrayLike) -> jax.Array:
        u = _unit(_mask_tokens(h, mask))
        # A matmul of unit vectors instead of broadcasting _cosine to [B, T, T, D]; full
        # precision because TPUs (and TF32 GPUs) would otherwise round these cosines.
        return jnp.einsum("...id,...jd->...ij", u, u, precision=jax.lax.Precision.HIGHEST)

    pairs = mask[..., :, None] & mask[..., None, :]
    per_example = _masked_mean(jnp.abs(gram(h_obj) - gram(h_cat)), pairs, axis=(-2, -1))
    return jnp.mean(per_example)


def pairwise_loss_with_concept(
    h_obj: ArrayLike, h_cat: ArrayLike, context_mask: ArrayLike, concept_obj: ArrayLike,
    concept_cat: ArrayLike,
) -> jax.Array:
    """The pairwise regularizer as the thesis writes it: the token-cosine matrices span the
    context tokens and the concept, S* (y*) aligned with the super-category word (y_cat), so the
    placeholder's interactions with its context must match the super-category's.

    Args:
      h_obj, h_cat: [B, T, D] text-encoder outputs, aligned on context positions.
      context_mask: [B, T] bool.
      concept_obj, concept_cat: [B, D] the concept's encoding in y* and in y_cat (a span of
        several tokens: their mean).

    Returns:
      Scalar, mean over the batch: `pairwise_loss` over the context plus one concept slot.
    """
    mask = jnp.asarray(context_mask, bool)
    with_concept = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], axis=-1)
    return pairwise_loss(
        jnp.concatenate([_float(h_obj), _float(concept_obj)[..., None, :]], axis=-2),
        jnp.concatenate([_float(h_cat), _float(concept_cat)[..., None, :]], axis=-2),
        with_concept,
    )


def hinge_loss(learned: ArrayLike, super_embed: ArrayLike, margin: float) -> jax.Array:
    """Thesis hinge regularizer: mean over vectors of max(0, margin - cos(v*, v_cat)).

    Args:
      learned: [..., V, D] learned input embeddings.
      super_embed: super-category input embedding(s), broadcastable to ``learned`` ([D], [V, D]
        or [..., V, D]).
      margin: cosine above which a vector is not penalised.

    Returns:
      Scalar.
    """
    return jnp.mean(jax.nn.relu(margin - _cosine(learned, super_embed)))


def rescale_to_norm(v: ArrayLike, ref_norm: ArrayLike) -> jax.Array:
    """``v / ||v|| * ref_norm`` along the last axis (CoRe's norm hold after each update).

    Args:
      v: [..., D].
      ref_norm: shaped ``v.shape[:-1]`` or broadcastable to it (e.g. a scalar).

    Returns:
      Array shaped and typed like ``v``; zero where ``v`` is the zero vector.
    """
    v = jnp.asarray(v)
    out = _unit(v) * jnp.expand_dims(_float(ref_norm), -1)
    return out.astype(v.dtype)


def semantic_preservation_loss(pooled_obj: ArrayLike, pooled_cls: ArrayLike) -> jax.Array:
    """ClassDiffusion SPL: mean of 1 - cos between pooled text features.

    Args:
      pooled_obj: [B, D] pooled features of "a photo of a S* cls".
      pooled_cls: [B, D] pooled features of "a photo of a cls".

    Returns:
      Scalar.
    """
    return jnp.mean(1.0 - _cosine(pooled_obj, pooled_cls))


def knowledge_preservation_loss(h: ArrayLike, h_frozen: ArrayLike, mask: ArrayLike) -> jax.Array:
    """TextBoost knowledge preservation: 1 - cos between current and frozen encoder outputs.

    Args:
      h, h_frozen: [B, T, D] outputs of the fine-tuned and the frozen text encoder.
      mask: [B, T] bool, the tokens compared.

    Returns:
      Scalar: mean over all selected tokens of the batch (token-weighted, not per example).
    """
    mask = jnp.asarray(mask, bool)
    cos = _cosine(_mask_tokens(h, mask), _mask_tokens(h_frozen, mask))
    return _masked_mean(1.0 - cos, mask, axis=None)


def attention_statistic_loss(
    stats: ArrayLike, target: ArrayLike, token_mask: ArrayLike
) -> jax.Array:
    """One statistic's part of AttnDreamBooth's cross-attention regularizer, as its official
    code reduces it (`train_attndreambooth.py`, `F.mse_loss` per sample and layer): per layer and
    example, the mean over the placeholder tokens (multi-vector S*) of (stats - target)^2;
    then the mean over layers; then the SUM over the batch (the code adds each sample's loss).

    Args:
      stats: [L, B, T] per-layer, per-token statistic of the attention map (mean or variance
        over heads and spatial positions).
      target: broadcastable to [L, B, T], e.g. [L, B, 1]: the super-category token's statistic.
      token_mask: [B, T] bool, the placeholder positions.

    Returns:
      Scalar.
    """
    mask = jnp.asarray(token_mask, bool)
    diff = jnp.where(mask, _float(stats) - _float(target), 0.0)
    per_layer = _masked_mean(jnp.square(diff), mask, axis=-1)  # [L, B]
    return jnp.sum(jnp.mean(per_layer, axis=0))


def attention_mean_var_loss(
    attn_mean: ArrayLike,
    attn_var: ArrayLike,
    target_mean: ArrayLike,
    target_var: ArrayLike,
    token_mask: ArrayLike,
    mean_weight: ArrayLike = 1.0,
    var_weight: ArrayLike = 1.0,
) -> jax.Array:
    """AttnDreamBooth's cross-attention regularizer (arXiv 2406.05000; official code
    `train_attndreambooth.py` l.~1456-1468): keep the new token's attention map like its
    super-category's through the map's mean and variance, which leaves the layout free.

    Per example and layer: mean_weight * MSE(mu[V], mu[cat]) + var_weight * MSE(var[V], var[cat])
    with the MSE over the placeholder tokens; averaged over layers, SUMMED over the batch (the
    code's reduction, so the weights it tunes, 0.1 / 0 then 2 / 5 at batch 8, keep their
    meaning). Both sides keep their gradient (the code detaches neither); pass targets through
    `stop_gradient` for a constant target. It is `attention_statistic_loss` of each statistic,
    weighted and added.

    Args:
      attn_mean, attn_var: [L, B, T] per-layer, per-token mean / variance of the attention
        probabilities over heads and spatial positions.
      target_mean, target_var: broadcastable to [L, B, T] (e.g. [L, B, 1]: the token after S*).
      token_mask: [B, T] bool, the placeholder positions.
      mean_weight, var_weight: the code's `--reg_mean_weight`, `--reg_var_weight`.

    Returns:
      Scalar.
    """
    return (mean_weight * attention_statistic_loss(attn_mean, target_mean, token_mask)
            + var_weight * attention_statistic_loss(attn_var, target_var, token_mask))

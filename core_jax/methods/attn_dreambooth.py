"""AttnDreamBooth (Pang et al., NeurIPS 2024, arXiv 2406.05000): textual inversion, then the
cross-attention layers, then the whole U-Net, each with a regularizer that keeps the new
token's cross-attention map like its super-category's.

Facts (METHODS.md section 4; the official code github.com/lyuPang/AttnDreamBooth,
`train_attndreambooth.py` and `bash_script/train_attndreambooth.sh`, read for what METHODS.md
leaves open):
- Caption in every stage "a photo of a [V] [super-category]" (`--instance_prompt="a photo of a
  {} ${category}"`): the config's `concept.caption = "a photo of a {} {cls}"`.
- Stage 1 (textual_inversion + attn_dreambooth): the [V] vector from the category's embedding,
  lr 1e-3, 60 steps, batch 8, regularizer weights mean 0.1, var 0.
- Stage 2 (cross_attention_finetune + attn_dreambooth): the code's `unfreeze_model(unet,
  ['attn2'])` unfreezes every parameter whose name contains "attn2", i.e. to_q, to_k, to_v and
  to_out.0 (kernel and bias) of all 16 cross-attention layers, not only K/V as the paper's text
  suggests; we follow the code: the group "cross_attention" holds those leaves per run. The
  embedding is frozen (the stage loads it into the token table of a plain CLIPTextModel and
  optimizes only the U-Net's trainable parameters); lr 2e-5, 100 steps, batch 8, mean 2, var 5.
- Stage 3 (unet_finetune + attn_dreambooth): the whole U-Net from stage 2's weights
  (`--load_from_checkpoint` of stage 2's U-Net; here the run's "unet" copy starts from the
  frozen U-Net with the stage-2 projections merged, which then replace the group,
  `core_jax.train.stages.stage_params`), embedding frozen, lr 2e-6, 500 steps, batch 8, mean
  2, var 5. Text encoder frozen throughout. AdamW (0.9, 0.999), weight decay 1e-2, constant lr,
  no clipping (the code clips only in stage 1, and there only the U-Net's gradient-less weights).
- The regularizer (code l.~1456-1468), on the MAIN diffusion forward (no extra U-Net pass): per
  cross-attention layer, the mean and variance of each token's attention probability over
  (heads, H*W); per sample `w_mean * MSE(mu[V], mu[cat]) + w_var * MSE(var[V], var[cat])`, the
  MSE over [V]'s vectors, [cat] the ONE token right after [V] (the first token of a multi-token
  category); summed over the batch, averaged over the layers; neither side detached
  (`losses.attention_mean_var_loss`). Its two parts are the terms "attn_mean" and "attn_var"
  weighted by `lambda_attn_mean` and `lambda_attn_var` (per-run numbers: a weight 0 drops its
  part, as stage 1's variance weight does), so the sum is the code's `attn_loss`.
- One difference kept: the code's variance is torch's `var`, unbiased (divided by n - 1, n =
  heads x H*W); the U-Net sows the population variance (divided by n). The ratio n / (n - 1) is
  at most 1.0008 for SD 2.1 at 512 px (n >= 20 heads x 64 positions), so it is not corrected.

Exports: the learned token (`learned_embeds.safetensors`, as every run) and, after stage 3, the
run's U-Net as a diffusers folder (`unet/`); a run whose stage 3 is skipped exports the frozen
U-Net with its stage-2 projections merged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from core_jax import losses
from core_jax.methods import unet_subset
from core_jax.methods.base import Method, Settings, Term
from core_jax.methods.diffusion_term import DEFAULTS as DIFFUSION_DEFAULTS
from core_jax.methods.diffusion_term import diffusion_term

GROUP = "cross_attention"
# Every parameter of every attn2 (cross-attention) module: the code's unfreeze_model(['attn2']).
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")
LEAVES = ("kernel", "bias")

# The code's stages 2 and 3; stage 1 sets mean 0.1, var 0 (configs/attn_dreambooth_*.py).
DEFAULTS = {**DIFFUSION_DEFAULTS, "lambda_attn_mean": 2.0, "lambda_attn_var": 5.0}


def cross_attention_params(unet_params: Any) -> dict[str, Any]:
    """The frozen to_q, to_k, to_v and to_out_0 kernels and biases of every cross-attention
    layer, as a tree mirroring the U-Net's params."""
    modules = unet_subset.attention_projection_paths(unet_params, PROJECTIONS)
    return unet_subset.subset(unet_params, modules, LEAVES)


def token_after(placeholders: jax.Array) -> jax.Array:
    """The position right after the last placeholder token of a caption (placeholders [T]
    bool): the super-category's first token in "a photo of a S* <cls>". 0 without any."""
    positions = jnp.arange(placeholders.shape[-1])
    return jnp.max(jnp.where(placeholders, positions, -1), axis=-1) + 1


def statistic_loss(stats: jax.Array, placeholders: jax.Array, shards: jax.Array) -> jax.Array:
    """One concept's part of the regularizer for one statistic: stats [L, b, T] of its local
    rows against the token after S*, placeholders [T]. The code sums over the batch; the step
    averages the local sums over data shards, so they are scaled back to the global sum."""
    target = jnp.take(stats, token_after(placeholders), axis=-1)[..., None]  # [L, b, 1]
    mask = jnp.broadcast_to(placeholders, stats.shape[1:])  # [b, T]
    return losses.attention_statistic_loss(stats, target, mask) * shards


def _terms(settings: Settings) -> tuple[Term, ...]:
    def part(stats: jax.Array, placeholders: jax.Array, shards: jax.Array, numbers):
        return statistic_loss(stats, placeholders, shards)

    return (
        diffusion_term(settings),
        Term("attn_mean", ("caption_stats", "caption_placeholders", "data_shards"), part,
             weight="lambda_attn_mean"),
        Term("attn_var", ("caption_stats_var", "caption_placeholders", "data_shards"), part,
             weight="lambda_attn_var"),
    )


CROSS_ATTENTION = unet_subset.subset_group(cross_attention_params)

METHOD = Method(
    name="attn_dreambooth",
    summary="AttnDreamBooth's attention mean/var regularizer on the caption pass "
            "(S* vs the token after it)",
    defaults=DEFAULTS,
    source="arXiv 2406.05000 and its official code (train_attndreambooth.py l.~1456-1468); "
           "METHODS.md 4",
    numbers=("lambda_attn_mean", "lambda_attn_var"),
    terms=_terms,
)

FINETUNE = Method(
    name="cross_attention_finetune",
    summary="train every cross-attention projection (to_q, to_k, to_v, to_out; kernels and "
            "biases) with S* frozen (AttnDreamBooth's stage 2)",
    defaults=DIFFUSION_DEFAULTS,
    source="AttnDreamBooth's code: unfreeze_model(unet, ['attn2']); METHODS.md 4",
    trains={GROUP: "learning_rate"},
    groups={GROUP: CROSS_ATTENTION},
    terms=lambda settings: (diffusion_term(settings),),
)

METHODS = (METHOD, FINETUNE)

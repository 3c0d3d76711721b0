"""ClassDiffusion (Huang et al., ICLR 2025, arXiv 2405.17532): Custom Diffusion plus a
semantic preservation loss that keeps "S* <cls>" close to "<cls>" in the text encoder's pooled
feature space, so the learned word stays a member of its class and composes like it.

    L = L_recon + lambda_spl (1 - cos(f("a photo of a S* <cls>"), f("a photo of a <cls>")))

Combine with the method that trains S* and the cross-attention K/V: the stage
`("custom_diffusion", "class_diffusion")` is the paper's method (its code's
`--freeze_model crossattn_kv`, masked loss, zoom augmentation: `custom_diffusion.py`). The
official script trains without prior preservation when the loss is on (its `elif
args.use_spl` branch), so the configs do too.

The phrases are the code's, fixed (`core_jax.train.concepts.SEMANTIC_PHRASES`), encoded in one
text-encoder call per step (`phrase_hidden`), the class phrase as a constant (the code's frozen
branch). f is the final-layer-norm hidden state at a pooled position, which the paper and the
code choose differently (METHODS.md section 2); `spl_pool` picks:
- "paper" (default): the first end-of-text token of each phrase, CLIP's pooled output, as the
  paper writes ("using EOS tokens as text features following CLIP").
- "code": `argmax(input_ids)`, what transformers' `pooler_output` computes for SD 1.5's text
  encoder (its config's `eos_token_id` is 2, the legacy branch): in the phrase with S* that is
  the placeholder's position (added tokens have the highest ids; with several vectors, the
  last), in the class phrase still the end-of-text. So the code compares S*'s own hidden state
  with the class phrase's end-of-text.

`lambda_spl` defaults to the code's `--spl_weight 1.0` (`scripts/train_single.sh`). SD 1.x /
2.x only: on SDXL the pooled feature is the second encoder's projection, which the paper does
not define the loss on (refused in one line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core_jax import losses
from core_jax.errors import InputError
from core_jax.methods.base import Method, Settings, Term

POOLS = ("paper", "code")
DEFAULTS = {"lambda_spl": 1.0, "spl_pool": "paper"}


def pooled_positions(ids: jax.Array, pool: str, eos_token_id: int) -> jax.Array:
    """Where each phrase of ids [..., T] is pooled: its first end-of-text ("paper") or the
    position of its largest id ("code", transformers' legacy pooling). [...] int."""
    if pool == "paper":
        return jnp.argmax(ids == eos_token_id, axis=-1)
    return jnp.argmax(ids, axis=-1)


def _terms(settings: Settings) -> tuple[Term, ...]:
    if len(settings.encoder_widths) > 1:
        raise InputError("class_diffusion's semantic preservation loss is defined for one text "
                         "encoder (SD 1.x/2.x); this model has two (SDXL)")
    pool, eos = settings.stage["spl_pool"], settings.eos_token_id

    def spl(hidden: jax.Array, ids: jax.Array, numbers) -> jax.Array:
        # hidden [2, T, D]: the phrase with S*, the class phrase; ids [2, T]
        at = pooled_positions(ids, pool, eos)  # [2]
        pooled = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]  # [2, D]
        return losses.semantic_preservation_loss(pooled[:1], pooled[1:])

    return (Term("spl", ("phrase_hidden", "phrase_ids"), spl, weight="lambda_spl"),)


METHOD = Method(
    name="class_diffusion",
    summary="ClassDiffusion's semantic preservation loss between 'S* <cls>' and '<cls>' "
            "(with custom_diffusion: the paper's method)",
    defaults=DEFAULTS,
    source="arXiv 2405.17532; github.com/Rbrq03/ClassDiffusion (spl_weight 1.0, fixed phrases, "
           "pooler_output); METHODS.md 2",
    numbers=("lambda_spl",),
    choices={"spl_pool": POOLS},
    needs_trained=("embeds",),
    terms=_terms,
)

METHODS = (METHOD,)

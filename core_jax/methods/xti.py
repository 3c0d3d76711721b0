"""XTI, Extended Textual Inversion (Voynov et al., "P+", arXiv 2303.09522): S* has its own
vectors for each of the U-Net's cross-attention layers (16 in SD 1.x/2.x), trained with the
diffusion loss.

What trains: the group "xti", [C, L, V, D] (L cross-attention layers, V vectors of S*, D the
text encoder's width), every layer's vectors starting at the super-category word's embedding
(or `concept.init_word`'s), as Textual Inversion's. Nothing else trains; the frozen models stay
one shared copy, so C runs pack on the concept axis as TI's do.

How the U-Net reads them (`ParamGroup.layer_vectors`, `core_jax.train.passes`): each text pass
encodes its prompts once per layer, batched (ids [R, T] -> [L, R, T, D],
`core_jax.text.encode_per_layer`: L times TI's text cost, small beside the U-Net), and the
U-Net's layer k takes encoding k. That is done by an interceptor, not a U-Net input
(`core_jax.layer_contexts`): the U-Net's context argument carries the L encodings joined along
the token axis and each `attn2` call keeps its own. Chosen because the model stays untouched
(its parity tests and every other caller unchanged), the same code serves SDXL-sized layer
counts and NeTI (whose mapper gives a [L, V, D] set the same way), and gradients flow through
rematerialized blocks since the encodings are an argument, not a closed-over value. With all L
layers' vectors equal the U-Net's output is the ordinary TI call's.

The run's "embeds" (the one vector every run has) fills no prompt in an XTI run; a hook keeps it
at the mean of the layers' vectors after each update, so `learned_embeds.safetensors` (written
for every run) is a single-vector stand-in for tools that take one. The method's result is
`xti_embeds.safetensors` (`core_jax.export.save_xti_embeds`): one [V, D] tensor per layer named
by the layer's diffusers module ("down_blocks.0.attentions.0.transformer_blocks.0.attn2"), the
placeholder in the file's metadata; `core_jax.export.load_xti_embeds` reads it back in the
U-Net's layer order and `core-jax sample` draws with it (`core_jax.sample.generate` takes
[L, V, D] vectors).

With CoRe: refused in one line. CoRe's terms read y*'s encoding [T, D] and S*'s one vector
(L_emb, the norm hold, the thesis terms); under XTI there are L encodings of y*, and which of
them (or their mean) L_emb should match is a new method, not XTI. Train XTI and CoRe as
separate runs: a sweep's `settings` put them in one sweep, each method set its own group and
compiled program (`configs/xti_tiny.py` says how).

Keys (stage config): `learning_rate`, the vectors'. [UNVERIFIED] The paper's own learning
rate, batch and steps were not found: searched (2026-12) the docs, pages and code corpora for
the paper's text (only abstracts and summaries: XTI "converges faster than TI"), the project
page and diffusers' examples (no P+ script). Two reimplementations agree with the values used
here, and neither is the authors': mkshing/prompt-plus-pytorch's README trains with lr 5e-3,
constant, 500 steps, batch 1 x 8 accumulated, and says its hyper-parameters are TI's "except
the number of training steps as the paper said in section 4.2.2" (the section itself not
read); SeongMon/prompt-plus (built on it) uses lr 5e-3, 500 steps, batch 8. So: learning rate
5e-3 (also CoRe's stage 1, and diffusers' TI example's 5e-4 scaled by its batch of 4 x 2.5),
AdamW, constant; 500 steps (a tenth of TI's 5000, rinongal/textual_inversion's README).
SD 1.x/2.x only: SDXL (two text encoders, pooled embeddings) is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from core_jax.errors import InputError
from core_jax.methods.base import Hook, Method, ParamGroup, Settings, Term
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_term

GROUP = "xti"
LEARNING_RATE = 5e-3  # [UNVERIFIED] for XTI: two reimplementations' (the module docstring)
STEPS = 500  # [UNVERIFIED] for XTI: the reimplementations', a tenth of TI's 5000
# The shared computations that hold y*'s or the caption's one encoding, or S*'s one vector:
# under XTI there are L of them, so no other method's term may read them.
SINGLE_VECTOR_INPUTS = frozenset(
    {"embeds", "caption_hidden", "obj_hidden", "obj_aligned", "obj_concept", "obj_stats",
     "phrase_hidden"})


def _init_group(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> jax.Array:
    """Every layer's vectors start where TI's do (the super-category's or the init word's
    embedding): [C, L, V, D]."""
    if settings.attention_layers is None:
        raise ValueError("xti needs the U-Net's cross-attention layers (Settings)")
    num_layers = len(settings.attention_layers())
    start = data.super_embed if data.init_embed is None else data.init_embed  # [C, D]
    return jnp.broadcast_to(start[:, None, None], (start.shape[0], num_layers, num_vectors,
                                                   start.shape[-1])).astype(jnp.float32)


def _check_stage(settings: Settings) -> None:
    """One line for a stage XTI cannot run in: SDXL, or methods that read S*'s one vector or
    y*'s one encoding (CoRe, the thesis terms) or train "embeds"."""
    from core_jax.methods import get_method  # the registry imports this module

    if len(settings.encoder_widths) > 1:
        raise InputError("xti needs one text encoder (SD 1.x/2.x); SDXL's two are not built")
    for name in settings.stage.get("methods", ()):  # none where no stage is given (listing)
        method = get_method(name)
        if method.name == METHOD.name:
            continue
        reads = {i for term in method.terms(settings) for i in term.inputs}
        clash = sorted((reads & SINGLE_VECTOR_INPUTS) | ({"embeds"} & set(method.trains))
                       | {g for g, group in method.groups.items() if group.text_call})
        if clash or method.hooks(settings):
            raise InputError(
                f"xti cannot share a stage with {name}: it reads S*'s one vector or y*'s one "
                f"encoding ({', '.join(clash) or 'hooks'}), and xti has one per cross-attention "
                "layer; train them as separate runs (a sweep's settings)")


def _terms(settings: Settings) -> tuple[Term, ...]:
    _check_stage(settings)
    return (diffusion_term(settings),)


def _hooks(settings: Settings) -> tuple[Hook, ...]:
    """"embeds" follows the layers' mean (a single-vector stand-in for exports)."""

    def init(params: dict) -> jax.Array:
        return jnp.zeros((), jnp.float32)

    def layer_mean(params: dict, carry: jax.Array, step: jax.Array, numbers):
        return {**params, "embeds": jnp.mean(params[GROUP], axis=0)}, carry

    return (Hook("xti_layer_mean", init, layer_mean),)


XTI = ParamGroup(init=_init_group, layer_vectors=lambda vectors: vectors)

METHOD = Method(
    name="xti",
    summary="learn S*'s vectors per cross-attention layer with the diffusion loss (XTI, P+)",
    defaults=DEFAULTS,
    source="arXiv 2303.09522 (per-layer tokens); lr and steps [UNVERIFIED]: reimplementations' "
           "(mkshing/prompt-plus-pytorch; METHODS.md 5)",
    trains={GROUP: "learning_rate"},
    groups={GROUP: XTI},
    terms=_terms,
    hooks=_hooks,
)

METHODS = (METHOD,)

"""The thesis's regularizers (shared/seed, "Methods"), added to a method that trains S*.

- pairwise: the matrices of cosine similarities between the tokens' encodings of y* and of
  y_cat should agree (L1 of their difference). `pairwise_variant` "thesis": the matrices span
  the context tokens and the concept (S* aligned with the super-category word; a span of several
  tokens enters as its mean), the "placeholder and subclass interactions" the thesis names;
  "context": the context tokens only (the default: the form this project and its PyTorch
  reference, benchmarks/torch_reference.py, used first).
- hinge: max(0, margin - cos(v*, v_cat)) keeps the learned vectors near the super-category's
  input embedding.
"""

from __future__ import annotations

import jax

from core_jax import losses
from core_jax.methods.base import Method, Settings, Term

PAIRWISE_VARIANTS = ("context", "thesis")


def _pairwise_terms(settings: Settings) -> tuple[Term, ...]:
    inputs = ("obj_aligned", "cat_aligned", "context_mask")
    if settings.stage["pairwise_variant"] == "thesis":
        def pairwise(obj, cat, mask, concept_obj, concept_cat, numbers) -> jax.Array:
            return losses.pairwise_loss_with_concept(obj[None], cat[None], mask[None],
                                                     concept_obj[None], concept_cat[None])

        inputs += ("obj_concept", "cat_concept")
    else:
        def pairwise(obj: jax.Array, cat: jax.Array, mask: jax.Array, numbers) -> jax.Array:
            return losses.pairwise_loss(obj[None], cat[None], mask[None])

    return (Term("pairwise", inputs, pairwise, weight="lambda_pairwise"),)


def _hinge_terms(settings: Settings) -> tuple[Term, ...]:
    def hinge(embeds: jax.Array, super_embed: jax.Array, numbers) -> jax.Array:
        return losses.hinge_loss(embeds, super_embed, numbers["hinge_margin"])

    return (Term("hinge", ("embeds", "super_embed"), hinge, weight="lambda_hinge"),)


PAIRWISE = Method(
    name="pairwise",
    summary="thesis: pairwise token-cosine matrices of y* and y_cat agree (L1)",
    defaults={"lambda_pairwise": 0.0, "pairwise_variant": "context"},
    source="shared/seed (the thesis), 'Methods'",
    numbers=("lambda_pairwise",),
    choices={"pairwise_variant": PAIRWISE_VARIANTS},
    needs_trained=("embeds",),
    terms=_pairwise_terms,
)
HINGE = Method(
    name="hinge",
    summary="thesis: max(0, margin - cos(v*, v_cat)) keeps S* near its super-category",
    defaults={"lambda_hinge": 0.0, "hinge_margin": 0.5},
    source="shared/seed (the thesis), 'Methods'",
    numbers=("lambda_hinge", "hinge_margin"),
    needs_trained=("embeds",),
    terms=_hinge_terms,
)

METHODS = (PAIRWISE, HINGE)

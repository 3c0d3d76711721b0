"""Textual Inversion (Gal et al. 2022): the learned vectors of S*, diffusion loss only.

Multi-vector when `concept.num_vectors` > 1 (each placeholder token gets its own vector).
The other text-side methods (CoRe, the thesis terms) add their terms on top of this one.
"""

from core_jax.methods.base import Method
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_only

METHOD = Method(
    name="textual_inversion",
    summary="learn the vectors of S* with the diffusion loss (Gal et al. 2022)",
    defaults=DEFAULTS,
    source="arXiv 2208.01618; METHODS.md",
    trains={"embeds": "learning_rate"},
    terms=diffusion_only,
)

METHODS = (METHOD,)

"""Textual Inversion (Gal et al. 2022): the learned vectors of S*, diffusion loss only.

Multi-vector when `concept.num_vectors` > 1 (each placeholder token gets its own vector).
The other text-side methods (CoRe, the thesis terms) add their terms on top of this one.
It defines the group "embeds", which every run has (the caption names S*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from core_jax.methods.base import Method, ParamGroup, Settings
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_only


def _init_embeds(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> jax.Array:
    """Every vector starts at the super-category's embedding, or at the concept's
    `init_word`'s: [C, V, D]."""
    start = data.super_embed if data.init_embed is None else data.init_embed
    return jnp.repeat(start[:, None], num_vectors, axis=1)


EMBEDS = ParamGroup(init=_init_embeds)

METHOD = Method(
    name="textual_inversion",
    summary="learn the vectors of S* with the diffusion loss (Gal et al. 2022)",
    defaults=DEFAULTS,
    source="arXiv 2208.01618; METHODS.md",
    trains={"embeds": "learning_rate"},
    groups={"embeds": EMBEDS},
    terms=diffusion_only,
)

METHODS = (METHOD,)

"""What a stage-1 run carries from step to step, and the constant per-concept data it reads.

Every array has a leading concept axis C (C = 1 for an ordinary run), so the whole state and the
concept data shard over a `concept` mesh axis with one PartitionSpec.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class EmbeddingState:
    """Stage-1 train state: only the learned vectors and their optimizer state."""

    step: jax.Array  # [C] int32, optimizer steps taken (identical across concepts)
    embeds: jax.Array  # [C, V, D] learned vectors, fp32
    opt_state: Any  # optax state, each leaf with a leading [C]
    ref_norm: jax.Array  # [C, V] norms recorded when the rescale window opens
    rng: jax.Array  # [C, 2] uint32 raw keys: each concept's randomness is its own
    nonfinite_streak: jax.Array  # [C] int32 consecutive skipped (non-finite) steps


@flax.struct.dataclass
class ConceptData:
    """Constant per-concept inputs of the stage-1 step (computed once before training)."""

    latent_mean: jax.Array  # [C, P, h, w, 4] pool of encoded views, already scaled
    latent_std: jax.Array  # [C, P, h, w, 4]
    obj_ids: jax.Array  # [C, N, T] regularization prompts with the placeholder (y*)
    obj_index: jax.Array  # [C, N, T] aligned context positions in y*
    cat_index: jax.Array  # [C, N, T] aligned context positions in y_cat
    context_mask: jax.Array  # [C, N, T] bool
    cat_hidden: jax.Array  # [C, N, T, D] frozen encodings of y_cat (constant targets)
    num_templates: jax.Array  # [C] int32, templates in use (the rest is padding)
    super_embed: jax.Array  # [C, D] input embedding of the super-category word


@flax.struct.dataclass
class ConceptHypers:
    """Per-concept numbers a sweep may vary without recompiling: each is [C] float32."""

    learning_rate: jax.Array
    lambda_emb: jax.Array
    lambda_attn: jax.Array
    lambda_pairwise: jax.Array
    lambda_hinge: jax.Array
    hinge_margin: jax.Array

    @classmethod
    def broadcast(cls, num_concepts: int, **values: float) -> ConceptHypers:
        return cls(**{k: jnp.full((num_concepts,), v, jnp.float32) for k, v in values.items()})


def init_embedding_state(
    init_embeds: jax.Array, seeds: np.ndarray | list[int], optimizer: optax.GradientTransformation
) -> EmbeddingState:
    """State for C concepts from their initial vectors [C, V, D] and integer seeds [C]."""
    init_embeds = jnp.asarray(init_embeds, jnp.float32)
    num_concepts, num_vectors, _ = init_embeds.shape
    return EmbeddingState(
        step=jnp.zeros((num_concepts,), jnp.int32),
        embeds=init_embeds,
        opt_state=jax.vmap(optimizer.init)(init_embeds),
        ref_norm=jnp.linalg.norm(init_embeds, axis=-1),
        rng=jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds]),
        nonfinite_streak=jnp.zeros((num_concepts,), jnp.int32),
    )

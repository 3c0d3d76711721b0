"""What a stage carries from step to step, and the constant per-concept data it reads.

Every array has a leading concept axis C (C = 1 for an ordinary run), so the whole state and the
concept data shard over a `concept` mesh axis with one PartitionSpec.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """A stage's train state. `params` holds every parameter group the run has so far (the
    learned vectors "embeds" [C, V, D], a U-Net copy "unet", ...); the stage trains some of them
    and reads the rest."""

    step: jax.Array  # [C] int32, optimizer steps taken in this stage
    params: dict[str, Any]  # group -> pytree, each leaf [C, ...]
    opt_state: Any  # the optimizer's state of the trained groups, each leaf [C, ...]
    carry: dict[str, Any]  # hooks' carried values by hook name, each leaf [C, ...]
    rng: jax.Array  # [C, 2] uint32 raw keys: each concept's (and stage's) own stream
    nonfinite_streak: jax.Array  # [C] int32 consecutive skipped (non-finite) steps


@flax.struct.dataclass
class ConceptData:
    """Constant per-concept inputs of the step (computed once before training)."""

    latent_mean: jax.Array  # [C, P, h, w, 4] pool of encoded views, already scaled
    latent_std: jax.Array  # [C, P, h, w, 4]
    obj_ids: jax.Array  # [C, N, T] regularization prompts with the placeholder (y*)
    obj_index: jax.Array  # [C, N, T] aligned context positions in y*
    cat_index: jax.Array  # [C, N, T] aligned context positions in y_cat
    context_mask: jax.Array  # [C, N, T] bool
    cat_hidden: jax.Array  # [C, N, T, D] frozen encodings of y_cat (constant targets)
    num_templates: jax.Array  # [C] int32, templates in use (the rest is padding)
    super_embed: jax.Array  # [C, D] input embedding of the super-category word
    # SDXL: the frozen pooled text embeddings of y_cat and each view's add-time ids (original
    # size, crop top-left, target size: `core_jax.data.augmented_views_with_time_ids`), the
    # U-Net's added conditioning; None for SD 1.x/2.x.
    cat_pooled: jax.Array | None = None  # [C, N, P]
    time_ids: jax.Array | None = None  # [C, P, 6] float32
    # Prior preservation (DreamBooth, `core_jax/methods/prior.py`): the pool of class images the
    # frozen model generated (`core_jax/train/class_pool.py`), encoded as the views are, and the
    # frozen encoding of the class prompt. None (no leaves, nothing drawn) when no stage needs them.
    class_mean: jax.Array | None = None  # [C, Q, h, w, 4]
    class_std: jax.Array | None = None  # [C, Q, h, w, 4]
    class_hidden: jax.Array | None = None  # [C, T, D] "a photo of a <cls>"
    # Each concept's caption when it names the class ("a photo of a S* dog"); None: one caption
    # for every concept (`StepModels.caption_ids`).
    caption_ids: jax.Array | None = None  # [C, T]
    # Where S* starts when the concept names a word for it (`concept.init_word`, DreamBooth's
    # rare token); None: at super_embed.
    init_embed: jax.Array | None = None  # [C, D]
    # ClassDiffusion's two fixed phrases per concept (`concepts.SEMANTIC_PHRASES`): "a photo of
    # a S* <cls>" and "a photo of a <cls>"; None when no stage reads them.
    phrase_ids: jax.Array | None = None  # [C, 2, T]
    # TextBoost's prior prompts (`concepts.knowledge_prompts`): their ids, the frozen encoder's
    # encodings of them (constant targets) and each one's probability of being drawn for a row.
    kp_ids: jax.Array | None = None  # [C, K, T]
    kp_frozen: jax.Array | None = None  # [C, K, T, D]
    kp_weights: jax.Array | None = None  # [C, K], each row sums to 1
    # PALP's prompts (`core_jax.methods.palp`): the frozen encoder's encodings of each run's
    # clean target prompt y_c ("a sketch of a cat") and of the empty prompt, its classifier-free
    # guidance's unconditional branch (constants); None when no stage reads them.
    target_hidden: jax.Array | None = None  # [C, T, D]
    null_hidden: jax.Array | None = None  # [C, T, D]
    # [C, P, h, w, 1] bool: each view's object region (Custom Diffusion's zoom augmentation,
    # `core_jax.data.zoom_views`); None: no masks (every other augmentation)
    latent_mask: jax.Array | None = None


def stage_keys(seeds: list[int], stage: int) -> jax.Array:
    """[C, 2] raw keys of a stage: stage 0 uses the seed's key itself, later stages a key
    folded from it, so no stage redraws another's noise, timesteps or views."""

    def one(seed: int) -> jax.Array:
        key = jax.random.PRNGKey(int(seed))
        return key if stage == 0 else jax.random.fold_in(key, stage)

    return jnp.stack([one(s) for s in seeds])

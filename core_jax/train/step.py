"""The stage-1 step: diffusion loss and every context regularizer in one XLA graph.

Written once as a per-device function over the local slice of concepts [C_l] and of each concept's
batch rows [b_l], with `pmean` over the `data` axis; `shard_stage1_step` wraps it in
`jax.shard_map` over a (`concept`, `data`) mesh, `pmap_stage1_step` in `jax.pmap` over `data`.

Per step and concept: a template is drawn in the graph; the caption "a photo of a S*" and the
template's y* are encoded together with the learned vectors injected; the U-Net runs on the noisy
latents with the caption (diffusion loss) and, in the same batched call, with y* (attention
statistics); the y_cat pass and its encodings are constants (no backward). Randomness of a row
depends only on its concept's key, the step and the row's global index, so the result is the same
however concepts and rows are spread over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from core_jax import losses
from core_jax.diffusion import NoiseSchedule, add_noise, snr, training_target
from core_jax.models.unet import cross_attention_stats
from core_jax.train.state import ConceptData, ConceptHypers, EmbeddingState

DATA_AXIS = "data"
CONCEPT_AXIS = "concept"


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Static settings of the step: changing any of them compiles a new program.

    A term whose `use_*` is False is absent from the graph; its per-concept weight in
    `ConceptHypers` scales it when present (0 there switches it off without recompiling).
    """

    batch_size: int = 6  # rows per concept per step (global, over the data axis)
    caption_ids: tuple[int, ...] = ()  # [T] "a photo of a S*"
    placeholder_ids: tuple[int, ...] = ()  # [V] ids of the V placeholder tokens
    use_emb: bool = True
    use_attn: bool = True
    use_pairwise: bool = False
    use_hinge: bool = False
    emb_variant: str = "paper"
    attn_variant: str = "paper"
    rescale_start: int = 120  # hold the norm from this step...
    rescale_end: int = 180  # ...through this one (0 = never)
    min_snr_gamma: float | None = None

    @property
    def uses_regularization_prompts(self) -> bool:
        return self.use_emb or self.use_attn or self.use_pairwise


def make_optimizer(
    weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW without its learning rate (applied per concept by the step). Used under `vmap` over
    concepts, so clipping, when set, is per concept."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts += [optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay)]
    return optax.chain(*parts)


def inject_learned(
    ids: jax.Array, embeds: jax.Array, placeholder_ids: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Positions of placeholder tokens in ids [R, T] and the learned vectors for them [R, T, D]
    from each row's concept vectors embeds [R, V, D]."""
    matches = ids[..., None] == jnp.asarray(placeholder_ids)  # [R, T, V]
    mask = jnp.any(matches, axis=-1)
    slot = jnp.argmax(matches, axis=-1)  # which of the V vectors
    return jnp.take_along_axis(embeds, slot[..., None], axis=1), mask


def _row_noise(
    key: jax.Array, rows: jax.Array, pool_size: int, latent_shape: tuple[int, ...], num_t: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(view index, latent eps, timestep, diffusion noise) for global row indices rows [b_l]."""

    def one(row: jax.Array) -> tuple[jax.Array, ...]:
        k_view, k_latent, k_t, k_noise = jax.random.split(jax.random.fold_in(key, row), 4)
        return (
            jax.random.randint(k_view, (), 0, pool_size),
            jax.random.normal(k_latent, latent_shape),
            jax.random.randint(k_t, (), 0, num_t),
            jax.random.normal(k_noise, latent_shape),
        )

    return jax.vmap(one)(rows)


@flax.struct.dataclass
class Stage1Batch:
    """What one step draws; rows are concept-major (B = C_l * b_l)."""

    x0: jax.Array  # [B, h, w, 4] scaled latents sampled from the view pool
    noise: jax.Array  # [B, h, w, 4]
    timesteps: jax.Array  # [B] int32
    template: jax.Array  # [C_l] index of each concept's regularization template


def draw_batch(
    rng: jax.Array, step: jax.Array, data: ConceptData, schedule: NoiseSchedule, rows: jax.Array
) -> Stage1Batch:
    """A step's randomness: per concept from its own key rng [C_l, 2] and step [C_l], per row
    from its global index in `rows` [b_l], so any split over devices draws the same numbers."""
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(rng, step)
    template_keys, row_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    pool_size, latent_shape = data.latent_mean.shape[1], data.latent_mean.shape[2:]
    view, latent_eps, timesteps, noise = jax.vmap(
        lambda k: _row_noise(k, rows, pool_size, latent_shape, schedule.num_train_timesteps)
    )(row_keys)  # [C_l, b_l], [C_l, b_l, h, w, 4], [C_l, b_l], [C_l, b_l, h, w, 4]

    def take_rows(pool: jax.Array) -> jax.Array:
        return jax.vmap(lambda p, v: p[v])(pool, view)

    x0 = take_rows(data.latent_mean) + take_rows(data.latent_std) * latent_eps
    template = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, n))(
        template_keys, data.num_templates
    )
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    return Stage1Batch(flat(x0), flat(noise), flat(timesteps), template)


def stage1_loss(
    embeds: jax.Array,
    batch: Stage1Batch,
    data: ConceptData,
    hypers: ConceptHypers,
    frozen: dict[str, Any],
    schedule: NoiseSchedule,
    *,
    text_encoder: nn.Module,
    unet: nn.Module,
    config: Stage1Config,
    n_data: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over local concepts of each concept's weighted loss, and the per-concept terms [C_l].

    `embeds` [C_l, V, D]; `frozen` = {"text": ..., "unet": ...}. `n_data` is the number of data
    shards, needed only to turn the code-variant attention loss's local batch sum into the
    global sum after a mean over shards.
    """
    cfg = config
    num_concepts = embeds.shape[0]
    b_local = batch.timesteps.shape[0] // num_concepts
    x_t = add_noise(schedule, batch.x0, batch.noise, batch.timesteps)  # [B, h, w, 4]
    target = training_target(schedule, batch.x0, batch.noise, batch.timesteps)
    row_snr = snr(schedule, batch.timesteps) if cfg.min_snr_gamma else None

    def per_row(a: jax.Array) -> jax.Array:
        """[C_l, ...] per-concept value -> [B, ...] one copy per row."""
        return jnp.repeat(a, b_local, axis=0)

    def per_concept(a: jax.Array) -> jax.Array:
        """[B, ...] -> [C_l, b_l, ...]."""
        return a.reshape((num_concepts, b_local) + a.shape[1:])

    # --- Regularization prompts: one template per concept per step, drawn in the graph -------
    caption = jnp.broadcast_to(jnp.asarray(cfg.caption_ids), (num_concepts, len(cfg.caption_ids)))
    text_ids = caption
    if cfg.uses_regularization_prompts:

        def pick(table: jax.Array) -> jax.Array:
            return jax.vmap(lambda t, i: t[i])(table, batch.template)

        obj_ids, context_mask = pick(data.obj_ids), pick(data.context_mask)  # [C_l, T]
        obj_index, cat_index = pick(data.obj_index), pick(data.cat_index)
        h_cat = pick(data.cat_hidden)  # [C_l, T, D], constant
        h_cat_aligned = jnp.take_along_axis(h_cat, cat_index[..., None], axis=1)
        text_ids = jnp.concatenate([caption, obj_ids])  # [2 C_l, T]

    # The y_cat U-Net pass does not depend on `embeds`: forward only, no backward.
    if cfg.use_attn:
        _, cat_vars = unet.apply(
            {"params": frozen["unet"]}, x_t, batch.timesteps, per_row(h_cat),
            mutable=["attn_stats"],
        )
        stats_cat = jax.lax.stop_gradient(cross_attention_stats(cat_vars))  # [L, B, T]
        stats_cat = jnp.take_along_axis(stats_cat, per_row(cat_index)[None], axis=-1)

    repeats = text_ids.shape[0] // num_concepts
    inject, mask = inject_learned(text_ids, jnp.tile(embeds, (repeats, 1, 1)), cfg.placeholder_ids)
    hidden = text_encoder.apply(
        {"params": frozen["text"]}, text_ids, inject_embeds=inject, inject_mask=mask
    ).last_hidden_state  # [R, T, D]
    h_caption = hidden[:num_concepts]
    terms = {}
    if cfg.use_attn:
        h_obj = hidden[num_concepts:]
        # Caption and y* passes share one U-Net call on the same noisy latents.
        context = jnp.concatenate([per_row(h_caption), per_row(h_obj)])  # [2B, T, D]
        pred, obj_vars = unet.apply(
            {"params": frozen["unet"]}, jnp.concatenate([x_t, x_t]),
            jnp.concatenate([batch.timesteps, batch.timesteps]), context, mutable=["attn_stats"],
        )
        n_rows = x_t.shape[0]
        pred = pred[:n_rows]
        stats_obj = cross_attention_stats(obj_vars)[:, n_rows:]  # [L, B, T]
        stats_obj = jnp.take_along_axis(stats_obj, per_row(obj_index)[None], axis=-1)
        attn = jax.vmap(
            lambda so, sc, m: losses.core_attention_loss(
                so, sc, jnp.broadcast_to(m, so.shape[1:]), cfg.attn_variant
            ),
            in_axes=(1, 1, 0),
        )(
            stats_obj.reshape(stats_obj.shape[0], num_concepts, b_local, -1),
            stats_cat.reshape(stats_cat.shape[0], num_concepts, b_local, -1),
            context_mask,
        )
        terms["attn"] = attn * n_data if cfg.attn_variant == "code" else attn
    else:
        pred = unet.apply({"params": frozen["unet"]}, x_t, batch.timesteps, per_row(h_caption))
    terms["diffusion"] = jax.vmap(
        lambda p, t, s: losses.diffusion_loss(p, t, s, cfg.min_snr_gamma, schedule.prediction_type)
    )(per_concept(pred), per_concept(target), None if row_snr is None else per_concept(row_snr))
    if cfg.use_emb or cfg.use_pairwise:
        h_obj_aligned = jnp.take_along_axis(hidden[num_concepts:], obj_index[..., None], axis=1)
        pair = (h_obj_aligned[:, None], h_cat_aligned[:, None], context_mask[:, None])
        if cfg.use_emb:
            terms["emb"] = jax.vmap(
                lambda o, c, m: losses.core_embedding_loss(o, c, m, cfg.emb_variant)
            )(*pair)
        if cfg.use_pairwise:
            terms["pairwise"] = jax.vmap(losses.pairwise_loss)(*pair)
    if cfg.use_hinge:
        terms["hinge"] = jax.vmap(losses.hinge_loss)(embeds, data.super_embed, hypers.hinge_margin)
    weights = {
        "diffusion": 1.0, "emb": hypers.lambda_emb, "attn": hypers.lambda_attn,
        "pairwise": hypers.lambda_pairwise, "hinge": hypers.lambda_hinge,
    }
    per_concept_total = sum(weights[name] * value for name, value in terms.items())
    return jnp.sum(per_concept_total), {**terms, "loss": per_concept_total}


def stage1_step(
    state: EmbeddingState,
    data: ConceptData,
    hypers: ConceptHypers,
    frozen: dict[str, Any],
    schedule: NoiseSchedule,
    *,
    text_encoder: nn.Module,
    unet: nn.Module,
    optimizer: optax.GradientTransformation,
    config: Stage1Config,
) -> tuple[EmbeddingState, dict[str, jax.Array]]:
    """One optimizer step for the local concepts; call under an axis named `data`.

    Returns the new state and per-concept metrics ([C_l] each).
    """
    n_data = jax.lax.axis_size(DATA_AXIS)
    b_local = config.batch_size // n_data
    rows = jax.lax.axis_index(DATA_AXIS) * b_local + jnp.arange(b_local)
    batch = draw_batch(state.rng, state.step, data, schedule, rows)
    loss_fn = functools.partial(
        stage1_loss, batch=batch, data=data, hypers=hypers, frozen=frozen, schedule=schedule,
        text_encoder=text_encoder, unet=unet, config=config, n_data=n_data,
    )
    grads, terms = jax.grad(loss_fn, has_aux=True)(state.embeds)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    terms = jax.lax.pmean(terms, DATA_AXIS)

    # --- Update, per concept. A non-finite loss or gradient leaves that concept's vectors and
    # optimizer untouched; the step count still advances so the next step draws fresh inputs.
    finite = jnp.isfinite(terms["loss"]) & jnp.all(jnp.isfinite(grads), axis=(1, 2))
    updates, new_opt_state = jax.vmap(optimizer.update)(grads, state.opt_state, state.embeds)
    stepped = state.embeds - hypers.learning_rate[:, None, None] * updates
    new_step = state.step + 1
    norms = jnp.linalg.norm(stepped, axis=-1)  # [C_l, V]
    opening = (new_step == config.rescale_start)[:, None]
    ref_norm = jnp.where(opening, norms, state.ref_norm)
    holding = ((new_step > config.rescale_start) & (new_step <= config.rescale_end))[:, None, None]
    stepped = jnp.where(holding, losses.rescale_to_norm(stepped, ref_norm), stepped)

    def keep_if_finite(new: Any, old: Any) -> Any:
        return jax.tree.map(
            lambda n, o: jnp.where(finite.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
        )

    new_state = EmbeddingState(
        step=new_step,
        embeds=keep_if_finite(stepped, state.embeds),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        ref_norm=keep_if_finite(ref_norm, state.ref_norm),
        rng=state.rng,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        **terms,
        "grad_norm": jnp.sqrt(jnp.sum(jnp.square(grads), axis=(1, 2))),
        "embed_norm": jnp.mean(jnp.linalg.norm(new_state.embeds, axis=-1), axis=-1),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


StepFn = Callable[
    [EmbeddingState, ConceptData, ConceptHypers, dict, NoiseSchedule],
    tuple[EmbeddingState, dict[str, jax.Array]],
]


def make_mesh(num_concept_shards: int = 1, devices: list | None = None) -> Mesh:
    """A (`concept`, `data`) mesh over `devices` (default: all), concepts split `num_concept_shards`
    ways and rows over the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % num_concept_shards:
        raise ValueError(f"{len(devices)} devices do not split into {num_concept_shards} groups")
    grid = np.array(devices).reshape(num_concept_shards, -1)
    return Mesh(grid, (CONCEPT_AXIS, DATA_AXIS))


def jit_on_mesh(
    per_device: Callable, mesh: Mesh, in_specs: tuple, out_specs: tuple
) -> Callable:
    """`per_device` as one jitted program over `mesh` (`shard_map`), first argument donated.

    Inputs are placed on their shardings before the call (a no-op once they live there), so the
    first call's cache key equals later ones, whose state comes back sharded: one compilation
    per configuration. The jitted function is `.jitted`, for lowering and cost analysis."""
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    jitted = jax.jit(sharded, donate_argnums=0)
    shardings = [NamedSharding(mesh, spec) for spec in in_specs]

    def call(*args: Any) -> Any:
        return jitted(*(place(a, s) for a, s in zip(args, shardings, strict=True)))

    call.jitted = jitted
    return call


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Put every leaf of `tree` on `sharding`; arrays already there are left alone.

    With several processes (multi-host), a host value becomes a global array from this
    process's shards only, so a host may hold placeholders where other hosts own the data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def shard_stage1_step(mesh: Mesh, **step_kwargs: Any) -> StepFn:
    """The step over `mesh`: state and concept data split over `concept`, rows over `data`,
    frozen weights replicated and passed as arguments; the state is donated."""
    concept = P(CONCEPT_AXIS)
    return jit_on_mesh(
        functools.partial(stage1_step, **step_kwargs), mesh,
        in_specs=(concept, concept, concept, P(), P()), out_specs=(concept, concept),
    )


def pmap_stage1_step(devices: list | None = None, **step_kwargs: Any) -> StepFn:
    """The same per-device step under `jax.pmap` over the data axis (all concepts on every device).

    Takes and returns unreplicated values: the small state is copied to each device, the rest is
    broadcast, and the (identical) results are read from the first device."""
    devices = list(jax.devices() if devices is None else devices)
    per_device = functools.partial(stage1_step, **step_kwargs)
    mapped = jax.pmap(
        per_device, axis_name=DATA_AXIS, in_axes=(0, None, None, None, None), devices=devices,
    )

    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    per_device_copy, everywhere = NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())

    def step(state: EmbeddingState, *rest: Any) -> tuple[EmbeddingState, dict[str, jax.Array]]:
        stacked = jax.tree.map(lambda x: jnp.stack([x] * len(devices)), state)
        rest = tuple(jax.device_put(a, everywhere) for a in rest)
        out = mapped(jax.device_put(stacked, per_device_copy), *rest)
        return jax.tree.map(lambda x: x[0], out)

    return step

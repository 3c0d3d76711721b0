"""Stage 2: the learned embedding is frozen and the whole U-Net trains on the caption.

The caption's encoding depends only on frozen things (encoder and learned vectors), so it is
computed once before the loop and passed in; the step is U-Net forward + backward + AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from core_jax import losses
from core_jax.diffusion import NoiseSchedule, add_noise, snr, training_target
from core_jax.train.state import ConceptData
from core_jax.train.step import (
    CONCEPT_AXIS,
    DATA_AXIS,
    draw_batch,
    inject_learned,
    jit_on_mesh,
)


@flax.struct.dataclass
class UNetState:
    step: jax.Array  # [1] int32
    params: Any  # U-Net params (fp32 master copy)
    opt_state: Any
    rng: jax.Array  # [1, 2] uint32


def make_unet_optimizer(
    learning_rate: float = 2e-6, weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, clip_norm: float | None = None,
) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(learning_rate, b1, b2, eps, weight_decay))
    return optax.chain(*parts)


def init_unet_state(
    params: Any, seed: int, optimizer: optax.GradientTransformation
) -> UNetState:
    params = jax.tree.map(lambda p: jnp.array(p, jnp.float32), params)  # a copy we may donate
    return UNetState(
        step=jnp.zeros((1,), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed)[None],
    )


def stage2_step(
    state: UNetState,
    data: ConceptData,
    context: jax.Array,
    schedule: NoiseSchedule,
    *,
    unet: nn.Module,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    min_snr_gamma: float | None = None,
) -> tuple[UNetState, dict[str, jax.Array]]:
    """One U-Net update on the caption `context` [T, D]; call under an axis named `data`."""
    n_data = jax.lax.axis_size(DATA_AXIS)
    b_local = batch_size // n_data
    rows = jax.lax.axis_index(DATA_AXIS) * b_local + jnp.arange(b_local)
    batch = draw_batch(state.rng, state.step, data, schedule, rows)
    x_t = add_noise(schedule, batch.x0, batch.noise, batch.timesteps)
    target = training_target(schedule, batch.x0, batch.noise, batch.timesteps)
    row_snr = snr(schedule, batch.timesteps) if min_snr_gamma else None
    contexts = jnp.broadcast_to(context, (b_local,) + context.shape)

    def loss_fn(params: Any) -> jax.Array:
        pred = unet.apply({"params": params}, x_t, batch.timesteps, contexts)
        return losses.diffusion_loss(pred, target, row_snr, min_snr_gamma, schedule.prediction_type)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    loss = jax.lax.pmean(loss, DATA_AXIS)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = UNetState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
    )
    metrics = {
        "diffusion": loss[None], "loss": loss[None], "grad_norm": grad_norm[None],
        "nonfinite": (~finite).astype(jnp.int32)[None],
    }
    return new_state, metrics


def shard_stage2_step(mesh: Mesh, **step_kwargs: Any) -> Callable:
    """Stage 2 as one jitted program: rows over `data`, the U-Net state replicated, donated."""
    return jit_on_mesh(
        functools.partial(stage2_step, **step_kwargs), mesh,
        in_specs=(P(), P(CONCEPT_AXIS), P(), P()), out_specs=(P(), P()),
    )


def caption_context(
    text_encoder: nn.Module, placeholder_ids: tuple[int, ...], text_params: Any,
    caption: jax.Array, learned: jax.Array,
) -> jax.Array:
    """The caption's encoding [T, D] with the learned vectors [V, D]: stage 2's constant input."""
    inject, mask = inject_learned(caption[None], learned[None], placeholder_ids)
    return text_encoder.apply(
        {"params": text_params}, caption[None], inject_embeds=inject, inject_mask=mask
    ).last_hidden_state[0]


def stack_unet_states(states: list[UNetState]) -> UNetState:
    """C runs' stage-2 states with a leading concept axis (for the packed step)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def stage2_packed_step(
    states: UNetState, data: ConceptData, contexts: jax.Array, schedule: NoiseSchedule,
    **step_kwargs: Any,
) -> tuple[UNetState, dict[str, jax.Array]]:
    """`stage2_step` for the local C_l runs of a sweep, each with its own U-Net copy
    (states' leaves [C_l, ...], contexts [C_l, T, D]); metrics [C_l]."""

    def one(state: UNetState, concept_data: ConceptData, context: jax.Array):
        concept_data = jax.tree.map(lambda x: x[None], concept_data)
        return stage2_step(state, concept_data, context, schedule, **step_kwargs)

    states, metrics = jax.vmap(one)(states, data, contexts)
    return states, jax.tree.map(lambda m: m[:, 0], metrics)


def shard_stage2_packed_step(mesh: Mesh, **step_kwargs: Any) -> Callable:
    """The packed stage-2 step: each run's U-Net lives on the devices of its concept shard."""
    concept = P(CONCEPT_AXIS)
    return jit_on_mesh(
        functools.partial(stage2_packed_step, **step_kwargs), mesh,
        in_specs=(concept, concept, concept, P()), out_specs=(concept, concept),
    )

"""The step, one for every stage of every method: draw the batch, run what the terms read, sum
the weighted terms, update through the stage's optimizer, apply the hooks, guard non-finite
values. No method is named here; `StageProgram` says what a stage's step does.

Written once as a per-device function over the local slice of concepts [C_l] and of each
concept's batch rows [b_l], with `pmean` over the `data` axis; `shard_step` wraps it in
`jax.shard_map` over a (`concept`, `data`) mesh. Randomness of a row depends only on its
concept's key, the step and the row's global index, so the result is the same however concepts
and rows are spread over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from core_jax.diffusion import NoiseSchedule
from core_jax.methods import Hook, Settings, Term
from core_jax.train.parallel import CONCEPT_AXIS, DATA_AXIS, jit_on_mesh
from core_jax.train.passes import Batch, Passes, StepModels, closure, draw_batch
from core_jax.train.state import ConceptData, TrainState

Numbers = dict[str, jax.Array]  # per-run numbers of the packed concepts, each [C]


@dataclasses.dataclass(frozen=True)
class StageProgram:
    """Everything static about a stage's step: changing any of it compiles anew. A term here is
    present; its per-run weight (in `Numbers`) scales it, and 0 turns it off for that run."""

    batch_size: int  # rows per concept per step (global, over the data axis)
    models: StepModels
    trains: Mapping[str, str]  # trained parameter group -> the number that is its learning rate
    terms: tuple[Term, ...]
    hooks: tuple[Hook, ...]
    optimizer: optax.GradientTransformation  # without learning rate; applied per concept
    settings: Settings  # what the methods were built with; a group's first value reads it too

    @functools.cached_property
    def needs(self) -> frozenset[str]:
        return closure({name for term in self.terms for name in term.inputs})


def make_optimizer(
    weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step applies each run's own). Used under `vmap` over
    concepts, so clipping, when set, is per run."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts += [optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay)]
    return optax.chain(*parts)


def init_state(program: StageProgram, params: dict[str, Any], rng: jax.Array) -> TrainState:
    """A stage's first state from the run's parameters so far (each leaf [C, ...]) and its
    keys rng [C, 2]."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)  # a copy it may donate
    trained = {group: params[group] for group in program.trains}
    num_concepts = rng.shape[0]
    return TrainState(
        step=jnp.zeros((num_concepts,), jnp.int32),
        params=params,
        opt_state=jax.vmap(program.optimizer.init)(trained),
        carry={hook.name: jax.vmap(hook.init)(params) for hook in program.hooks},
        rng=jnp.array(rng),  # a copy: the step donates its state
        nonfinite_streak=jnp.zeros((num_concepts,), jnp.int32),
    )


def _gate(x: jax.Array, on: jax.Array) -> jax.Array:
    """x, through which no gradient flows back for the concepts where `on` [C] is False: a term
    a run weights 0 can neither move that run's parameters nor, by a NaN, block its update."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    on = on.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(on, x, jax.lax.stop_gradient(x))


def evaluate(term: Term, passes: Passes, numbers: Numbers) -> jax.Array:
    """The term's value per local concept [C_l] and its weighted contribution [C_l]."""
    inputs = [passes[name] for name in term.inputs]
    if term.weight is None:
        value = jax.vmap(term.fn)(*inputs, numbers)
        return value, value
    weight = numbers[term.weight]
    on = weight > 0
    value = jax.vmap(term.fn)(*(_gate(x, on) for x in inputs), numbers)
    return value, jnp.where(on, weight * value, 0.0)


def _per_concept(tree: Any, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """fn over the non-concept axes of all leaves joined end to end: [C]. One reduction: a sum
    of per-leaf reductions (hundreds for a U-Net) took XLA:CPU's fusion pass many minutes."""
    leaves = jax.tree.leaves(tree)
    return fn(jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1))


def stage_loss(
    trained: dict[str, Any],
    params: dict[str, Any],
    batch: Batch,
    data: ConceptData,
    numbers: Numbers,
    frozen: dict[str, Any],
    schedule: NoiseSchedule,
    *,
    program: StageProgram,
    data_shards: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum over local concepts of each one's weighted terms, and the terms and total per
    concept [C_l]. `trained` are the groups the stage trains (what the gradient is taken of);
    `params` the run's others."""
    passes = Passes({**params, **trained}, frozen, batch, data, schedule, program.models,
                    program.needs, data_shards)
    values, total = {}, 0.0
    for term in program.terms:
        values[term.name], weighted = evaluate(term, passes, numbers)
        total = total + weighted  # [C_l]
    return jnp.sum(total), {**values, "loss": total}


def train_step(
    state: TrainState,
    data: ConceptData,
    numbers: Numbers,
    frozen: dict[str, Any],
    schedule: NoiseSchedule,
    *,
    program: StageProgram,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step for the local concepts; call under an axis named `data`.

    Returns the new state and per-concept metrics ([C_l] each)."""
    n_data = jax.lax.axis_size(DATA_AXIS)
    b_local = program.batch_size // n_data
    rows = jax.lax.axis_index(DATA_AXIS) * b_local + jnp.arange(b_local)
    batch = draw_batch(state.rng, state.step, data, schedule, rows)
    trained = {group: state.params[group] for group in program.trains}
    loss_fn = functools.partial(stage_loss, params=state.params, batch=batch, data=data,
                                numbers=numbers, frozen=frozen, schedule=schedule,
                                program=program, data_shards=n_data)
    grads, terms = jax.grad(loss_fn, has_aux=True)(trained)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    terms = jax.lax.pmean(terms, DATA_AXIS)

    # --- Update, per concept. A non-finite loss or gradient leaves that concept's parameters,
    # optimizer and hooks untouched; the step count still advances so the next step draws fresh
    # inputs, and the streak counts how many in a row were skipped.
    finite = jnp.isfinite(terms["loss"]) & (_per_concept(
        grads, lambda g: jnp.sum(~jnp.isfinite(g), axis=1)) == 0)
    updates, opt_state = jax.vmap(program.optimizer.update)(grads, state.opt_state, trained)

    def descend(lr_key: str, p: Any, u: Any) -> Any:
        lr = numbers[lr_key]
        return jax.tree.map(lambda a, b: a - lr.reshape((-1,) + (1,) * (a.ndim - 1)) * b, p, u)

    params = dict(state.params)
    for group, lr_key in program.trains.items():
        params[group] = descend(lr_key, trained[group], updates[group])
    step = state.step + 1
    carry = dict(state.carry)
    for hook in program.hooks:
        params, carry[hook.name] = jax.vmap(hook.apply)(params, carry[hook.name], step, numbers)

    def keep_if_finite(new: Any, old: Any) -> Any:
        return jax.tree.map(
            lambda n, o: jnp.where(finite.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
        )

    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = TrainState(
        step=step,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        carry=keep_if_finite(carry, state.carry),
        rng=state.rng,
        nonfinite_streak=streak,
    )
    metrics = {
        **terms,
        "grad_norm": jnp.sqrt(_per_concept(grads, lambda g: jnp.sum(jnp.square(g), axis=1))),
        "nonfinite": (~finite).astype(jnp.int32),
        "nonfinite_streak": streak,
    }
    if "embeds" in program.trains:
        metrics["embed_norm"] = jnp.mean(jnp.linalg.norm(new_state.params["embeds"], axis=-1),
                                         axis=-1)
    return new_state, metrics


StepFn = Callable[
    [TrainState, ConceptData, Numbers, dict, NoiseSchedule],
    tuple[TrainState, dict[str, jax.Array]],
]


def shard_step(mesh: Mesh, program: StageProgram) -> StepFn:
    """The step over `mesh`: state, concept data and numbers split over `concept`, rows over
    `data`, frozen weights replicated and passed as arguments; the state is donated."""
    concept = P(CONCEPT_AXIS)
    return jit_on_mesh(
        functools.partial(train_step, program=program), mesh,
        in_specs=(concept, concept, concept, P(), P()), out_specs=(concept, concept),
    )

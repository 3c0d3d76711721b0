"""The step, one for every stage of every method: draw the batch, run what the terms read, sum
the weighted terms, update through the stage's optimizer, apply the hooks, guard non-finite
values. No method is named here; `StageProgram` says what a stage's step does.

Written once as a per-device function over the local slice of concepts [C_l] and of each
concept's batch rows [b_l], with `pmean` over the `data` axis; `shard_step` wraps it in
`jax.shard_map` over a (`concept`, `data`) mesh. Randomness of a row depends only on its
concept's key, the step and the row's global index, so the result is the same however concepts
and rows are spread over devices.

A group that is a whole model copy (a run's own U-Net: stage 2, DreamBooth) may have its
parameters and optimizer state split over the `data` axis as well (`StageProgram.shard_groups`,
FSDP-style): each device keeps 1/n of every large leaf, gathers the whole group for the passes,
and gets back only its slice of the gradient (`psum_scatter`), which its optimizer updates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from core_jax.diffusion import NoiseSchedule
from core_jax.methods import Hook, Settings, Term
from core_jax.train.parallel import CONCEPT_AXIS, DATA_AXIS, jit_on_mesh, place
from core_jax.train.passes import (
    Batch,
    Passes,
    StepModels,
    closure,
    draw_batch,
    timestep_probabilities,
)
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
    clip_norm: float | None = None  # each run's gradient clipped to this global norm
    # Trained groups whose parameters and optimizer state split over the `data` axis when it
    # has more than one device (`shard_state`).
    shard_groups: tuple[str, ...] = ()
    # How each row's timestep is drawn (the stage's `timestep_sampling`): "uniform" or
    # "snr_weighted" (TextBoost's, `core_jax.diffusion.snr_weighted_timestep_probabilities`).
    timestep_sampling: str = "uniform"

    @functools.cached_property
    def needs(self) -> frozenset[str]:
        return closure({name for term in self.terms for name in term.inputs})


def make_optimizer(
    weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step applies each run's own) and without clipping
    (the step clips each run's gradient by its global norm, which a split state cannot see).
    Element-wise, so it updates a slice of a split state as it would the whole."""
    return optax.chain(optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay))


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
    split: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step for the local concepts; call under an axis named `data`.

    `split`: for each trained group, the axis each leaf is split along over `data` (`WHOLE`:
    not split; `split_axes`); None: no leaf is. Returns the new state and per-concept metrics
    ([C_l] each)."""
    n_data = jax.lax.axis_size(DATA_AXIS)
    b_local = program.batch_size // n_data
    rows = jax.lax.axis_index(DATA_AXIS) * b_local + jnp.arange(b_local)
    batch = draw_batch(state.rng, state.step, data, schedule, rows,
                       timestep_probabilities(program.timestep_sampling, schedule))
    trained = {group: state.params[group] for group in program.trains}  # split groups: slices
    split = split or jax.tree.map(lambda _: WHOLE, trained)
    loss_fn = functools.partial(stage_loss, params=state.params, batch=batch, data=data,
                                numbers=numbers, frozen=frozen, schedule=schedule,
                                program=program, data_shards=n_data)
    grads, terms = jax.grad(loss_fn, has_aux=True)(_gather_split(trained, split))
    grads = _reduce_split(grads, split)  # each device's slice of the mean gradient
    terms = jax.lax.pmean(terms, DATA_AXIS)

    # --- Update, per concept. A non-finite loss or gradient leaves that concept's parameters,
    # optimizer and hooks untouched; the step count still advances so the next step draws fresh
    # inputs, and the streak counts how many in a row were skipped.
    # One pass over the gradient gives both: a sum of squares is finite iff every element is
    # (or one is so large, > 1e19, that skipping the step is right anyway).
    grad_norm = jnp.sqrt(_squared_norm(grads, split))  # [C_l]
    finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
    if program.clip_norm:
        # optax.clip_by_global_norm's rule, with the norm over the whole (split) gradient.
        scale = jnp.where(grad_norm < program.clip_norm, 1.0, program.clip_norm / grad_norm)
        grads = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), grads)
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
        "grad_norm": grad_norm,
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
    `data`, frozen weights replicated and passed as arguments; the state is donated. With a
    `data` axis of several devices, the program's `shard_groups` split over it as well."""
    concept = P(CONCEPT_AXIS)
    shards = mesh.shape[DATA_AXIS]
    groups = program.shard_groups if shards > 1 else ()
    if not groups:
        return jit_on_mesh(
            functools.partial(train_step, program=program), mesh,
            in_specs=(concept, concept, concept, P(), P()), out_specs=(concept, concept),
        )

    def program_for(state: TrainState, *rest: Any) -> Any:
        # Traced under jit: `state` has the global shapes the layout is read from.
        state_spec = state_specs(state, groups, shards)
        split = split_axes({g: state.params[g] for g in program.trains}, groups, shards)
        return jax.shard_map(
            functools.partial(train_step, program=program, split=split), mesh=mesh,
            in_specs=(state_spec, concept, concept, P(), P()), out_specs=(state_spec, concept),
            check_vma=False,
        )(state, *rest)

    jitted = jax.jit(program_for, donate_argnums=0)
    replicated = NamedSharding(mesh, P())

    def call(state: TrainState, data: Any, numbers: Any, frozen: Any, schedule: Any) -> Any:
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                 state_specs(state, groups, shards), is_leaf=_is_spec)
        state = jax.tree.map(place, state, shardings)
        data, numbers = place((data, numbers), NamedSharding(mesh, concept))
        return jitted(state, data, numbers, place(frozen, replicated), place(schedule, replicated))

    call.jitted = jitted
    return call


# --- Split groups (FSDP over `data`) ------------------------------------------------------------
WHOLE = -1  # a leaf every device of the concept's shard holds whole
# Leaves with fewer elements per run stay whole: gathering them would cost more than they hold.
MIN_SPLIT_ELEMENTS = 4096


def split_axis(shape: tuple[int, ...], shards: int) -> int:
    """The axis a leaf [C, ...] of a split group is cut along over `shards` devices: the longest
    one after the concept axis that they divide, or WHOLE."""
    if math.prod(shape[1:]) < MIN_SPLIT_ELEMENTS:
        return WHOLE
    axes = [a for a in range(1, len(shape)) if shape[a] % shards == 0]
    return max(axes, key=lambda a: shape[a], default=WHOLE)


def _group_of(path: tuple) -> str | None:
    """The parameter group a leaf belongs to: the first dictionary key on its path (params,
    gradients and the optimizer's moments are all keyed by group)."""
    return next((k.key for k in path if isinstance(k, jax.tree_util.DictKey)), None)


def split_axes(tree: Any, groups: tuple[str, ...], shards: int) -> Any:
    """`tree`'s structure with each leaf's split axis (WHOLE outside `groups`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: split_axis(x.shape, shards) if _group_of(path) in groups else WHOLE, tree
    )


def _spec(axis: int) -> P:
    return P(CONCEPT_AXIS) if axis == WHOLE else P(CONCEPT_AXIS, *[None] * (axis - 1), DATA_AXIS)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def state_specs(state: TrainState, groups: tuple[str, ...], shards: int) -> TrainState:
    """Each leaf's PartitionSpec: every leaf over `concept`; the parameters and optimizer
    moments of `groups` also over `data`, along their split axes."""
    return jax.tree.map(_spec, split_axes(state, groups, shards))


def unsplit(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every leaf split over `concept` only: split groups gathered whole on each
    concept shard, as per-run readers (exports, sample grids) slice them. Collective: every
    process calls it."""
    concept = NamedSharding(mesh, P(CONCEPT_AXIS))
    if all(getattr(x, "sharding", concept) == concept for x in jax.tree.leaves(tree)):
        return tree
    # A state restored at its last step never went through the step, so its leaves are still
    # where the restore put them (one device), which a jit over the mesh refuses.
    mesh_devices = set(mesh.devices.flat)
    tree = jax.tree.map(
        lambda x: x if x.sharding.device_set == mesh_devices else jax.device_put(x, concept), tree
    )
    return jax.jit(lambda t: t, out_shardings=concept)(tree)


def _gather_split(trained: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
    """The whole groups from each device's slices ([C_l, ...] leaves)."""
    return jax.tree.map(
        lambda x, a: x if a == WHOLE else jax.lax.all_gather(x, DATA_AXIS, axis=a, tiled=True),
        trained, split,
    )


def _reduce_split(grads: dict[str, Any], split: dict[str, Any]) -> dict[str, Any]:
    """The gradient's mean over `data`: whole where the leaf is whole, else this device's slice."""
    shards = jax.lax.axis_size(DATA_AXIS)

    def one(g: jax.Array, axis: int) -> jax.Array:
        if axis == WHOLE:
            return jax.lax.pmean(g, DATA_AXIS)
        return jax.lax.psum_scatter(g, DATA_AXIS, scatter_dimension=axis, tiled=True) / shards

    return jax.tree.map(one, grads, split)


def _squared_norm(grads: dict[str, Any], split: dict[str, Any]) -> jax.Array:
    """Each concept's squared global norm of its (split) gradient: [C_l]."""
    leaves, axes = jax.tree.leaves(grads), jax.tree.leaves(split)
    whole = [g for g, a in zip(leaves, axes, strict=True) if a == WHOLE]
    sliced = [g for g, a in zip(leaves, axes, strict=True) if a != WHOLE]
    reduce = functools.partial(_per_concept, fn=lambda g: jnp.sum(jnp.square(g), axis=1))
    total = jnp.zeros(leaves[0].shape[:1], jnp.float32)
    if whole:
        total = total + reduce(whole)
    if sliced:
        total = total + jax.lax.psum(reduce(sliced), DATA_AXIS)
    return total

"""A run is a sequence of stages; a stage is a list of methods with their trained groups, an
optimizer, steps and a batch. This module turns a run's config into each stage's
`StageProgram` and per-run `Numbers`, and makes the parameter groups the stages train.

Stages are the config's `stage1`, `stage2`, ... in order; a stage after the first with
`steps = 0` is skipped. CoRe is [embedding stage, U-Net stage]; a three-stage method adds
`stage3` to its config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core_jax.errors import InputError
from core_jax.methods import METHODS, Method, Settings, Term, get_method
from core_jax.train.passes import StepModels
from core_jax.train.state import ConceptData
from core_jax.train.step import Numbers, StageProgram, make_optimizer

# Parameter groups a method may train, and how a run's first value of each is made.
GROUPS = ("embeds", "unet")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The config's stages in order: stage1 always, later ones when they have steps."""
    names, k = [], 1
    while f"stage{k}" in config:
        if k == 1 or config[f"stage{k}"].steps > 0:
            names.append(f"stage{k}")
        k += 1
    return names


def stage_methods(stage: ml_collections.ConfigDict) -> list[Method]:
    return [get_method(name) for name in stage.methods]


def number_keys(stage: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stage's per-run numbers: its learning rates and its methods' numbers."""
    keys = ["learning_rate"]
    for method in stage_methods(stage):
        keys += [*method.trains.values(), *method.numbers]
    return tuple(dict.fromkeys(keys))


def check_stage(name: str, stage: ml_collections.ConfigDict) -> None:
    """One line for a stage that cannot run: unknown methods, missing keys, a weight given to a
    method the stage does not list, nothing trained, a negative weight or a bad choice."""
    if isinstance(stage.methods, str) or not stage.methods:
        raise InputError(
            f"{name}.methods is {stage.methods!r}; give a tuple of methods, e.g. "
            f"('textual_inversion', 'core'); `core-jax methods` lists them"
        )
    methods = stage_methods(stage)
    for method in methods:
        for key in method.defaults:
            if key not in stage:
                raise InputError(f"{name} lists {method.name} but has no {name}.{key} "
                                 f"(its default is {method.defaults[key]!r})")
    listed = {m.name for m in methods}
    for other in METHODS.values():
        if other.name in listed:
            continue
        for key in other.defaults:
            if key.startswith("lambda_") and key in stage and stage[key] > 0:
                raise InputError(f"{name}.{key} is {stage[key]} but {name}.methods does not list "
                                 f"{other.name}; add it or set the weight to 0")
    trained = {g for m in methods for g in m.trains}
    if not trained:
        raise InputError(f"{name}.methods {tuple(stage.methods)} train nothing; add a method "
                         "that trains parameters (textual_inversion, unet_finetune, ...)")
    for method in methods:
        missing = set(method.needs_trained) - trained
        if missing:
            raise InputError(f"{name}: {method.name} needs {', '.join(sorted(missing))} trained "
                             "by a method of the same stage")
        for key in method.numbers:
            if key.startswith("lambda_") and not stage[key] >= 0:  # also catches NaN
                raise InputError(f"{name}.{key} is {stage[key]}; a loss weight cannot be "
                                 "negative")
        for key, allowed in method.choices.items():
            if stage[key] not in allowed:
                raise InputError(f"{name}.{key} is {stage[key]!r}; choose one of "
                                 f"{', '.join(allowed)}")


def _plain(stage: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in stage.to_dict().items()}


def build_program(
    stages: Sequence[ml_collections.ConfigDict], models: StepModels, prediction_type: str
) -> StageProgram:
    """The program of one stage for packed runs whose configs of that stage are `stages` (equal
    but for their numbers). A weighted term is present when any run weights it."""
    first = stages[0]
    settings = Settings(_plain(first), prediction_type)
    terms: dict[str, Term] = {}
    hooks, trains = [], {}
    for method in stage_methods(first):
        trains.update(method.trains)
        hooks += method.hooks(settings)
        for term in method.terms(settings):
            present = term.weight is None or any(s[term.weight] > 0 for s in stages)
            if present:
                terms.setdefault(term.name, term)
    return StageProgram(
        batch_size=first.batch_size,
        models=models,
        trains=trains,
        terms=tuple(terms.values()),
        hooks=tuple(hooks),
        optimizer=make_optimizer(first.weight_decay, first.b1, first.b2,
                                 clip_norm=first.clip_norm or None),
    )


def stage_numbers(stages: Sequence[ml_collections.ConfigDict]) -> Numbers:
    """Each run's numbers of the stage, [C] float32 each."""
    return {key: jnp.asarray([s[key] for s in stages], jnp.float32)
            for key in number_keys(stages[0])}


def initial_group(
    group: str, data: ConceptData, frozen: dict[str, Any], num_vectors: int
) -> Any:
    """A parameter group's first value for the C packed runs (leading axis C)."""
    num_concepts = data.super_embed.shape[0]
    if group == "embeds":  # every vector starts at the super-category's embedding
        return jnp.repeat(data.super_embed[:, None], num_vectors, axis=1)  # [C, V, D]
    if group == "unet":  # each run its own copy of the frozen U-Net
        return jax.tree.map(
            lambda p: jnp.broadcast_to(p, (num_concepts,) + p.shape), frozen["unet"]
        )
    raise InputError(f"no parameter group {group!r}; known: {', '.join(GROUPS)}")


def stage_params(
    programs: Sequence[StageProgram], index: int, params: dict[str, Any], data: ConceptData,
    frozen: dict[str, Any], num_vectors: int,
) -> dict[str, Any]:
    """The run's parameters entering stage `index`: those it has, plus first values of the
    groups this stage trains for the first time. The learned vectors always exist (the caption
    names S*)."""
    params = dict(params)
    for group in ("embeds", *programs[index].trains):
        if group not in params:
            params[group] = initial_group(group, data, frozen, num_vectors)
    return params


def stage_ends(config: ml_collections.ConfigDict) -> list[int]:
    """The global step at which each stage ends."""
    return list(np.cumsum([config[name].steps for name in stage_names(config)]).tolist())

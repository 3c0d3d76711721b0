"""A run is a sequence of stages; a stage is a list of methods with their trained groups, an
optimizer, steps and a batch. This module turns a run's config into each stage's
`StageProgram` and per-run `Numbers`, and makes the parameter groups the stages train.

Stages are the config's `stage1`, `stage2`, ... in order; a stage after the first with
`steps = 0` is skipped. CoRe is [embedding stage, U-Net stage]; a three-stage method adds
`stage3` to its config.

A group's first value is made by its definition (`core_jax.methods.ParamGroup`) when the first
stage that trains it begins; later stages carry it. A whole U-Net copy (a group that is a whole
model, `ParamGroup.split_over_data`: unet_finetune's "unet") begun after groups the U-Net reads
(AttnDreamBooth's stage-2 "cross_attention") starts from the U-Net those make and replaces them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core_jax.diffusion import TIMESTEP_SAMPLING
from core_jax.errors import InputError
from core_jax.methods import METHODS, Method, Settings, Term, get_method, group_of
from core_jax.train.passes import StepModels, merged_unet, unet_groups
from core_jax.train.state import ConceptData
from core_jax.train.step import Numbers, StageProgram, make_optimizer

SHARD_STATE = ("auto", "off")  # a stage's shard_state (core_jax.config.STAGE_KEYS)


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


def run_text_keys(stage: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stage's per-run text keys (`Method.run_texts`): like its numbers, free to differ
    between the runs of one pack."""
    return tuple(dict.fromkeys(k for method in stage_methods(stage) for k in method.run_texts))


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
    for group in sorted(trained):
        group_of(group)  # one line for a group no method defines
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
    if stage.get("timestep_sampling", "uniform") not in TIMESTEP_SAMPLING:
        raise InputError(f"{name}.timestep_sampling is {stage.timestep_sampling!r}; choose one "
                         f"of {', '.join(TIMESTEP_SAMPLING)}")
    if stage.get("shard_state", "auto") not in SHARD_STATE:
        raise InputError(f"{name}.shard_state is {stage.shard_state!r}; choose one of "
                         f"{', '.join(SHARD_STATE)}")


def _plain(stage: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in stage.to_dict().items()}


def build_program(
    stages: Sequence[ml_collections.ConfigDict], models: StepModels, prediction_type: str
) -> StageProgram:
    """The program of one stage for packed runs whose configs of that stage are `stages` (equal
    but for their numbers). A weighted term is present when any run weights it."""
    first = stages[0]
    settings = Settings(_plain(first), prediction_type, models.encoder_widths,
                        models.attention_layers, models.text_encoder.config.eos_token_id)
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
        optimizer=make_optimizer(first.weight_decay, first.b1, first.b2),
        settings=settings,
        clip_norm=first.clip_norm or None,
        shard_groups=tuple(g for g in trains if first.shard_state == "auto"
                           and group_of(g).split_over_data),
        timestep_sampling=first.get("timestep_sampling", "uniform"),
    )


def stage_numbers(stages: Sequence[ml_collections.ConfigDict]) -> Numbers:
    """Each run's numbers of the stage, [C] float32 each."""
    return {key: jnp.asarray([s[key] for s in stages], jnp.float32)
            for key in number_keys(stages[0])}


def group_keys(group: str, keys: jax.Array) -> jax.Array:
    """A group's own raw keys [C, 2] from the runs' stage keys [C, 2]: folded with a salt of its
    name, so it draws nothing another group or the step's batches draw (those fold in step
    numbers, far below any salt in practice)."""
    salt = zlib.crc32(group.encode()) & 0x7FFFFFFF
    return jax.vmap(lambda k: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(k), salt)))(keys)


def initial_group(
    group: str, settings: Settings, data: ConceptData, frozen: dict[str, Any], num_vectors: int,
    keys: jax.Array,
) -> Any:
    """A parameter group's first value for the C packed runs (leading axis C), made as its
    method defines, with the settings of the stage that first trains it and the runs' stage
    keys [C, 2]."""
    return group_of(group).init(settings, data, frozen, num_vectors, group_keys(group, keys))


def stage_params(
    programs: Sequence[StageProgram], index: int, params: dict[str, Any], data: ConceptData,
    frozen: dict[str, Any], num_vectors: int, keys: jax.Array,
) -> dict[str, Any]:
    """The run's parameters entering stage `index`: those it has, plus first values of the
    groups this stage trains for the first time (`keys` [C, 2]: the runs' keys of this stage,
    `core_jax.train.state.stage_keys`). The learned vectors always exist (the caption names
    S*). A whole U-Net copy begun here takes the place of the groups the U-Net read, merged."""
    params = dict(params)
    program = programs[index]
    for group in ("embeds", *program.trains):
        if group in params:
            continue
        earlier = unet_groups(params)
        if earlier and group_of(group).split_over_data:  # a U-Net copy from the run's U-Net
            folded = {name: params.pop(name) for name in earlier}
            params[group] = jax.vmap(lambda values: merged_unet(values, frozen["unet"]))(folded)
        else:
            params[group] = initial_group(group, program.settings, data, frozen, num_vectors,
                                          keys)
    return params


def stage_ends(config: ml_collections.ConfigDict) -> list[int]:
    """The global step at which each stage ends."""
    return list(np.cumsum([config[name].steps for name in stage_names(config)]).tolist())

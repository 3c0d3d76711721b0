"""What a method is: data plus a few small pure functions (shared/DESIGN.md, "A method,
concretely"). The step skeleton (`core_jax.train.step`) never names a method: it asks the
stage's methods for their trainable groups, terms and hooks, computes the inputs the terms read
once, sums the weighted terms and updates.

A term is written for ONE concept: `fn(*inputs, numbers)` -> a scalar, where each input is that
concept's slice of a shared computation (`core_jax.train.passes.COMPUTATIONS` lists them and
their shapes) and `numbers` holds that concept's per-run numbers (weights, margins, ...). The
step vmaps it over the packed concepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

Numbers = Mapping[str, jax.Array]  # one concept's per-run numbers, each a scalar
UNetCall = Callable[[Any], Any]  # U-Net params -> the U-Net's outputs, its inputs bound
TextCall = Callable[[Any], Any]  # text-encoder params -> its outputs, its inputs bound


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a method's terms and hooks may read when the program is built (static: a change
    compiles anew): its stage's config values and facts of the model."""

    stage: Mapping[str, Any]  # the stage's config (stage1, stage2, ...), values as plain Python
    prediction_type: str = "epsilon"
    # The width of each text encoder's part of the context the U-Net reads, in order (SDXL base:
    # (768, 1280)); empty where no model is given (`core-jax methods`).
    encoder_widths: tuple[int, ...] = ()
    # The U-Net's cross-attention layers in the order of their statistics (paths such as
    # "up_blocks_0/attentions_1/transformer_blocks_0"); a function, as finding them traces the
    # U-Net. None where no model is given.
    attention_layers: Callable[[], tuple[str, ...]] | None = None
    eos_token_id: int = 49407  # the (first) text encoder's end-of-text id


@dataclasses.dataclass(frozen=True)
class Term:
    """One loss term. Terms of the same name within a stage are one term (the diffusion loss
    of two methods is computed and counted once)."""

    name: str  # its key in the metrics
    inputs: tuple[str, ...]  # shared computations it reads, in `fn`'s argument order
    fn: Callable[..., jax.Array]  # (*inputs, numbers) -> scalar, for one concept
    weight: str | None = None  # the per-run number that scales it; None: weight 1, always on


@dataclasses.dataclass(frozen=True)
class Hook:
    """A transform of one concept's parameters after each update (CoRe's norm hold), with a
    value it carries from step to step (stored in the train state and checkpointed)."""

    name: str
    init: Callable[[dict[str, jax.Array]], Any]  # params -> carry, at the stage's start
    # (params, carry, step after the update, numbers) -> (params, carry)
    apply: Callable[[dict[str, jax.Array], Any, jax.Array, Numbers], tuple[dict, Any]]


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A parameter group a method adds to a run (its key in the run's params, e.g. "lora"): how
    its first value is made and, if the U-Net reads it, how a U-Net call uses it. Only what a
    group holds is per run; the frozen models stay one shared copy, so a group is all a new
    method needs to pack C runs against one U-Net.

    `unet_call` runs per run, inside the step's trace (vmapped over packed runs, so it sees one
    run's value without the concept axis). Several groups of a run compose in name order, the
    first outermost."""

    # (settings of the stage that first trains it, concept data, frozen params {"text", "unet"},
    #  vectors per placeholder, raw keys [C, 2] of the C packed runs) -> the first value, every
    # leaf [C, ...]. The keys are the group's own (see `core_jax.train.stages.initial_group`).
    init: Callable[[Settings, Any, Mapping[str, Any], int, jax.Array], Any]
    # (call, the U-Net params it would use, one run's value) -> call's outputs: call it with
    # other params (a per-run U-Net), or around an interceptor (adapters). None: the U-Net does
    # not read the group.
    unet_call: Callable[[UNetCall, Any, Any], Any] | None = None
    # (U-Net params, one run's value) -> the U-Net params the run amounts to (for sampling and
    # merged exports; never inside the step). Required with `unet_call`.
    merge: Callable[[Any, Any], Any] | None = None
    # (frozen U-Net params) -> values every run of the group reads and none trains (SVDiff's
    # singular vectors): made once per frozen U-Net, outside any step, and shared by all packed
    # runs like the frozen models (the step gets them as `frozen[<group>]`,
    # `core_jax.train.passes.with_shared`). With it, `unet_call` and `merge` take them as a
    # last argument; they always derive from the frozen U-Net, never from a merged one.
    shared: Callable[[Any], Any] | None = None
    # A whole model copy (a run's own U-Net): with `shard_state` "auto" its parameters and
    # optimizer state split over the devices of the run's data axis (`core_jax.train.step`).
    # Hooks then see only a device's slice of it, so no hook may read such a group.
    split_over_data: bool = False
    # The text encoder's counterparts of `unet_call` and `merge`: (call, the encoder's params,
    # one run's value) -> call's outputs, and (encoder params, one run's value) -> the params
    # the run amounts to (TextBoost's adapters). With `text_call` the step encodes each run's
    # prompts through its own value (vmapped over packed runs). SD 1.x/2.x's one encoder.
    text_call: Callable[[TextCall, Any, Any], Any] | None = None
    text_merge: Callable[[Any, Any], Any] | None = None
    # (one run's value as a checkpoint restores it without a target: plain dicts, static
    # fields lost; the config of the stage that trains it) -> the value. None: used as restored.
    from_checkpoint: Callable[[Any, Mapping[str, Any]], Any] | None = None
    # (one run's value) -> S*'s vectors per cross-attention layer [L, V, D] (P+: XTI's group;
    # NeTI's mapper would compute them). With it, every text pass encodes its prompts once per
    # layer and the U-Net's layer k reads encoding k (`core_jax.layer_contexts`): the run's
    # "embeds" then fill no prompt. None: the group supplies no per-layer vectors.
    layer_vectors: Callable[[Any], Any] | None = None
    # (one run's value, each row's timestep [b], raw row keys [b, 2] for the group's training
    # randomness or None (sampling)) -> (S*'s vectors per row and cross-attention layer
    # [b, L, V, D], bypass vectors [b, L, V, D] or None) (NeTI's mapper). With it the caption
    # pass encodes per row and per layer and row r's layer k reads encoding (r, k); with bypass
    # vectors, layer k's values read a second encoding whose S* states before the final layer
    # norm went through `bypass` (the keys read the first). None: no timestep-dependent vectors.
    # When sampling it may also take `truncation=k` (NeTI's `truncation_idx`,
    # `core_jax.layer_contexts.TimestepVectors.truncation`).
    timestep_vectors: Callable[..., tuple[Any, Any]] | None = None
    # (S*'s encoder states before the final layer norm [..., D], bypass vectors [..., D]) ->
    # the states the values' encoding takes there. Required where `timestep_vectors` gives
    # bypass vectors.
    bypass: Callable[[Any, Any], Any] | None = None


def _none(settings: Settings) -> tuple:
    return ()


@dataclasses.dataclass(frozen=True)
class Method:
    """A method as the stages use it. Its config keys live in the config of the stage that lists
    it (`stage1.methods = ("textual_inversion", "core")` reads `stage1.lambda_emb`, ...)."""

    name: str
    summary: str  # one line for `core-jax methods`
    defaults: Mapping[str, Any]  # the config keys it reads, with their defaults
    source: str = ""  # where the defaults come from (paper, code, METHODS.md)
    # Of those keys, the per-run numbers: a sweep varies them without compiling anew.
    numbers: tuple[str, ...] = ()
    # Of its string keys, those each run may set its own way: they fill the runs' concept data
    # (PALP's target prompt, encoded once), never the program, so runs that differ in them
    # still pack into one program.
    run_texts: tuple[str, ...] = ()
    # Of its string keys, the allowed values.
    choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Parameter groups it trains, each with the key of its learning rate.
    trains: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Parameter groups it defines (a method may train a group another method defines).
    groups: Mapping[str, ParamGroup] = dataclasses.field(default_factory=dict)
    # Groups that must be trained by some method of the same stage for this one to make sense.
    needs_trained: tuple[str, ...] = ()
    terms: Callable[[Settings], tuple[Term, ...]] = _none
    hooks: Callable[[Settings], tuple[Hook, ...]] = _none

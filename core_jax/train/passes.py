"""The shared computations of a step, each computed at most once and only when a term reads it.

A term names its inputs (`Term.inputs`); the step builds a `Passes` and hands each term the
per-concept slices of what it named. What no present term names never enters the graph. Every
value has a leading concept axis [C_l] (the local concepts); rows of a concept are its local
batch rows [b_l].

| name | shape | what |
|---|---|---|
| embeds | [C, V, D] | the learned vectors |
| super_embed | [C, D] | input embedding of the super-category word |
| target | [C, b, h, w, c] | the denoising target (epsilon or v) |
| snr | [C, b] | signal-to-noise ratio of each row's timestep |
| caption_hidden | [C, T, D] | encoder output for the caption ("a photo of a S*") |
| obj_hidden | [C, T, D] | encoder output for the step's y* (a template filled with S*) |
| obj_aligned / cat_aligned | [C, T, D] | y* / y_cat encodings at aligned context positions |
| context_mask | [C, T] | which aligned positions are context tokens |
| obj_concept / cat_concept | [C, D] | S*'s encoding in y* / the super-category's in y_cat |
| caption_pred | [C, b, h, w, c] | the U-Net's prediction with the caption |
| caption_stats / _var | [C, L, b, T] | that call's per-token attention mean / variance |
| caption_placeholders | [C, T] | where the caption holds S*'s placeholder tokens |
| prior_pred | [C, b, h, w, c] | the U-Net's prediction for noised class latents, class prompt |
| prior_target | [C, b, h, w, c] | the denoising target of those rows |
| obj_stats / cat_stats | [C, L, b, T] | per-token cross-attention means with y* / y_cat |
| loss_mask | [C, b, h, w, 1] | each row's object region (views with masks only) |
| data_shards | [C] | how many devices split the rows (for batch sums) |
| palp_x0 | [C, b, h, w, c] | x0 the caption pass predicts (PALP's x^_0; gradient flows) |
| palp_teacher | [C, 2, b, h, w, c] | frozen U-Net's noise (unconditional, target prompt) at x^_t |
| palp_student | [C, 2, b, h, w, c] | the run's own U-Net's noise (unconditional, caption) at x^_t |

With per-layer vectors (a group with `ParamGroup.layer_vectors`: XTI), caption_hidden and
obj_hidden are [C, L, T, D], one encoding per cross-attention layer, and the U-Net passes give
layer k encoding k (`core_jax.layer_contexts`); terms that read them whole refuse such runs.
With vectors that depend on each row's timestep (`ParamGroup.timestep_vectors`: NeTI),
caption_hidden is [C, b, L, T, D], one encoding per row and layer, or [C, b, 2 L, T, D] with
the values' (bypassed) encodings after the keys'; obj_hidden is not built for such runs.

The y_cat encodings are constants of the concept data; the y_cat U-Net pass is forward only.
PALP's x^_t is x^_0 noised again with the row's own noise and timestep, under stop_gradient; its
teacher (the frozen U-Net, never the runs' groups) and student (each run's U-Net, its groups
applied) passes are forward only, their noise predictions constants (`stop_gradient`), in
epsilon space whatever the model predicts.
The class rows of prior preservation (b per concept, drawn from the concept's pool of generated
class images, `ConceptData.class_mean`) ride in the caption pass's U-Net call, as diffusers'
`train_dreambooth.py` concatenates instance and class batches.
Where a run has parameter groups the U-Net reads (its own U-Net copy "unet", adapters "lora",
spectral shifts "svdiff"; `core_jax.methods.ParamGroup.unet_call`), U-Net calls are vmapped
over concepts with the frozen U-Net shared (unbatched), and so are the groups' shared values
(`frozen[<group>]`, see `with_shared`); otherwise all rows go through the one frozen U-Net in
one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.diffusion import (
    TIMESTEP_SAMPLING,
    NoiseSchedule,
    add_noise,
    denoised,
    snr,
    snr_weighted_timestep_probabilities,
    training_target,
)
from core_jax.layer_contexts import (
    TimestepVectors,
    cross_attention_layers,
    join_layers,
    per_layer_contexts,
)
from core_jax.methods import UNetCall, group_of
from core_jax.models.unet import cross_attention_stats
from core_jax.text import (
    encode_per_layer,
    encode_per_layer_with_bypass,
    encode_sdxl_with_learned,
    encode_with_learned,
    placeholder_slots,
    second_encoder_ids,
)
from core_jax.train.state import ConceptData


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The modules and token ids a program is built around (static)."""

    text_encoder: nn.Module
    unet: nn.Module
    caption_ids: tuple[int, ...]  # [T] "a photo of a S*"
    placeholder_ids: tuple[int, ...]  # [V] ids of the V placeholder tokens
    # SDXL: the second text encoder and its tokenizer's end-of-text and padding ids (each row's
    # add-time ids come with its view, `ConceptData.time_ids`). None: SD 1.x/2.x.
    text_encoder_2: nn.Module | None = None
    eos_id: int = 49407
    pad_id_2: int = 0

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Each text encoder's width in the context, in order (SDXL: encoder 1's first)."""
        encoders = [self.text_encoder, self.text_encoder_2]
        return tuple(e.config.hidden_size for e in encoders if e is not None)

    def attention_layers(self) -> tuple[str, ...]:
        """The U-Net's cross-attention layers, in the order of their statistics."""
        return cross_attention_layers(self.unet)

    def encode(
        self, frozen: dict[str, Any], ids: jax.Array, learned: jax.Array | None,
        slots: tuple[jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The U-Net's context [R, T, D] of ids [R, T] with the learned vectors, and (SDXL)
        the pooled text embedding [R, P] its added conditioning reads; None otherwise."""
        if self.text_encoder_2 is None:
            return encode_with_learned(self.text_encoder, frozen["text"], ids, learned,
                                       slots), None
        ids_2 = second_encoder_ids(ids, self.eos_id, self.pad_id_2)
        return encode_sdxl_with_learned(self.text_encoder, self.text_encoder_2, frozen, ids,
                                        ids_2, learned, slots)


@flax.struct.dataclass
class Batch:
    """What one step draws; rows are concept-major (B = C_l * b_l)."""

    x0: jax.Array  # [B, h, w, c] scaled latents sampled from the view pool
    noise: jax.Array  # [B, h, w, c]
    timesteps: jax.Array  # [B] int32
    template: jax.Array  # [C_l] index of each concept's regularization template
    # The class rows (only when the concept data has a class pool): [B, h, w, c], [B], [B].
    prior_x0: jax.Array | None = None
    prior_noise: jax.Array | None = None
    prior_timesteps: jax.Array | None = None
    mask: jax.Array | None = None  # [B, h, w, 1] bool: the row's view's object region, if any
    time_ids: jax.Array | None = None  # [B, 6] SDXL: the row's view's add-time ids
    kp_index: jax.Array | None = None  # [B] int: the row's prior prompt (TextBoost)
    # [B, 2] raw keys: each row's own stream for a parameter group's randomness (NeTI's nested
    # dropout), from its concept's key, the step and its global row index.
    row_keys: jax.Array | None = None


# Folded into a concept's row key for its class rows: they draw nothing its photo rows draw.
_PRIOR_SALT = 0x5052494F  # "PRIO"
_KNOWLEDGE_SALT = 0x4B4E4F57  # "KNOW": a row's prior prompt
_GROUP_SALT = 0x47525550  # "GRUP": a row's stream for parameter groups


def _row_noise(
    key: jax.Array, rows: jax.Array, pool_size: int, latent_shape: tuple[int, ...], num_t: int,
    timestep_probabilities: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(view index, latent eps, timestep, diffusion noise) for global row indices rows [b_l];
    timesteps uniform, or drawn by `timestep_probabilities` [num_t] where given."""

    def timestep(k: jax.Array) -> jax.Array:
        if timestep_probabilities is None:
            return jax.random.randint(k, (), 0, num_t)
        return jax.random.choice(k, num_t, p=timestep_probabilities).astype(jnp.int32)

    def one(row: jax.Array) -> tuple[jax.Array, ...]:
        k_view, k_latent, k_t, k_noise = jax.random.split(jax.random.fold_in(key, row), 4)
        return (
            jax.random.randint(k_view, (), 0, pool_size),
            jax.random.normal(k_latent, latent_shape),
            timestep(k_t),
            jax.random.normal(k_noise, latent_shape),
        )

    return jax.vmap(one)(rows)


def draw_batch(
    rng: jax.Array, step: jax.Array, data: ConceptData, schedule: NoiseSchedule, rows: jax.Array,
    timestep_probabilities: jax.Array | None = None,
) -> Batch:
    """A step's randomness: per concept from its own key rng [C_l, 2] and step [C_l], per row
    from its global index in `rows` [b_l], so any split over devices draws the same numbers.
    With a class pool, each row also draws a class row (pool index, noise, timestep) from its
    key folded with a salt. Timesteps (the class rows' too) are uniform, or drawn by
    `timestep_probabilities` [T] (a stage's `timestep_sampling`, `timestep_probabilities`)."""
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(rng, step)
    template_keys, row_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    pool_size, latent_shape = data.latent_mean.shape[1], data.latent_mean.shape[2:]
    view, latent_eps, timesteps, noise = jax.vmap(
        lambda k: _row_noise(k, rows, pool_size, latent_shape, schedule.num_train_timesteps,
                             timestep_probabilities)
    )(row_keys)  # [C_l, b_l], [C_l, b_l, h, w, c], [C_l, b_l], [C_l, b_l, h, w, c]

    def take_rows(pool: jax.Array) -> jax.Array:
        return jax.vmap(lambda p, v: p[v])(pool, view)

    x0 = take_rows(data.latent_mean) + take_rows(data.latent_std) * latent_eps
    template = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, n))(
        template_keys, data.num_templates
    )
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    mask = None if data.latent_mask is None else flat(take_rows(data.latent_mask))
    time_ids = None if data.time_ids is None else flat(take_rows(data.time_ids))
    kp_index = None
    if data.kp_ids is not None:  # each row one prior prompt, drawn by the prompts' weights
        kp_index = flat(jax.vmap(lambda k, w: jax.vmap(lambda r: jax.random.choice(
            jax.random.fold_in(jax.random.fold_in(k, _KNOWLEDGE_SALT), r), w.shape[0], p=w)
        )(rows))(row_keys, data.kp_weights))
    group_keys = flat(jax.vmap(lambda k: jax.vmap(lambda r: jax.random.key_data(
        jax.random.fold_in(jax.random.fold_in(k, _GROUP_SALT), r)))(rows))(row_keys))
    if data.class_mean is None:
        return Batch(flat(x0), flat(noise), flat(timesteps), template, mask=mask,
                     time_ids=time_ids, kp_index=kp_index, row_keys=group_keys)
    class_size = data.class_mean.shape[1]
    view, latent_eps, prior_t, prior_noise = jax.vmap(
        lambda k: _row_noise(jax.random.fold_in(k, _PRIOR_SALT), rows, class_size, latent_shape,
                             schedule.num_train_timesteps, timestep_probabilities)
    )(row_keys)
    prior_x0 = (jax.vmap(lambda p, v: p[v])(data.class_mean, view)
                + jax.vmap(lambda p, v: p[v])(data.class_std, view) * latent_eps)
    return Batch(flat(x0), flat(noise), flat(timesteps), template, flat(prior_x0),
                 flat(prior_noise), flat(prior_t), mask, time_ids, kp_index, group_keys)


# The caption pass's attention statistics: computation name -> the kind the U-Net sows.
CAPTION_STATS = {"caption_stats": "mean", "caption_stats_var": "var"}
STAT_KINDS = ("mean", "var")

# What each computation needs computed first (beyond the batch and the constants).
_DEPENDS = {
    "obj_aligned": ("obj_hidden",),
    "obj_concept": ("obj_hidden",),
    "caption_pred": ("caption_hidden",),
    "caption_stats": ("caption_hidden",),
    "caption_stats_var": ("caption_hidden",),
    "obj_stats": ("obj_hidden",),
    "palp_x0": ("caption_pred",),
    "palp_teacher": ("palp_x0",),
    "palp_student": ("palp_x0", "caption_hidden"),
}


def closure(names: set[str]) -> frozenset[str]:
    """`names` and everything they are computed from."""
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in COMPUTATIONS:
            known = ", ".join(sorted(COMPUTATIONS))
            raise KeyError(f"no shared computation {name!r}; known: {known}")
        if name not in needed:
            needed.add(name)
            todo.extend(_DEPENDS.get(name, ()))
    return frozenset(needed)


def unet_groups(params: dict[str, Any]) -> list[str]:
    """The groups of a run's params that the U-Net reads, in the order they compose."""
    return [name for name in sorted(params) if group_of(name).unet_call is not None]


def with_groups(
    call: UNetCall, values: dict[str, Any], shared: dict[str, Any] | None = None
) -> UNetCall:
    """`call` (U-Net params -> outputs) as one run's groups `values` (each without the concept
    axis) make it, with `shared` the shared values of the groups that have them; the first
    group in name order is outermost."""
    for name in sorted(values, reverse=True):
        use, extra = group_of(name).unet_call, ()
        if group_of(name).shared is not None:
            if not shared or name not in shared:
                raise ValueError(f"group {name!r} reads shared values the step was not given; "
                                 "make its frozen weights with passes.with_shared")
            extra = (shared[name],)

        def call(unet_params: Any, use=use, inner=call, value=values[name], extra=extra) -> Any:
            return use(inner, unet_params, value, *extra)

    return call


def with_shared(frozen: dict[str, Any], groups: Iterable[str]) -> dict[str, Any]:
    """`frozen` ({"text", "unet"}) plus, under its name, the shared values of each of `groups`
    that has them (`core_jax.methods.ParamGroup.shared`), made from the frozen U-Net: what a
    step of runs with those groups is given as its frozen weights."""
    out = dict(frozen)
    for name in sorted(set(groups)):
        make = group_of(name).shared
        if make is not None and name not in out:
            out[name] = make(frozen["unet"])
    return out


def _layer_group(params: dict[str, Any]) -> str | None:
    """The run's group that supplies S*'s vectors per cross-attention layer, if any."""
    return next((name for name in sorted(params) if group_of(name).layer_vectors), None)


def layer_vectors(params: dict[str, Any]) -> jax.Array | None:
    """S*'s vectors per cross-attention layer [C, L, V, D] from the run's group that supplies
    them (`ParamGroup.layer_vectors`), each leaf [C, ...]; None when no group does."""
    name = _layer_group(params)
    return None if name is None else jax.vmap(group_of(name).layer_vectors)(params[name])


def run_vectors(params: dict[str, Any]) -> Any:
    """The vectors one run (its params without the concept axis) samples with: per layer
    [L, V, D] when a group supplies them, a `TimestepVectors` when a group makes them from the
    timestep (NeTI), else its "embeds" [V, D]."""
    timed = _timestep_group(params)
    if timed is not None:
        group = group_of(timed)
        return TimestepVectors(params[timed], group.timestep_vectors, group.bypass)
    name = _layer_group(params)
    return params["embeds"] if name is None else group_of(name).layer_vectors(params[name])


def merged_unet(params: dict[str, Any], unet_params: Any) -> Any:
    """The U-Net params one run (its params without the concept axis) amounts to: for sampling
    and exports, never inside the step. Shared values come from `unet_params` as given (the
    frozen U-Net), not from what an earlier group merged into it."""
    frozen_unet = unet_params
    for name in unet_groups(params):
        group = group_of(name)
        extra = (group.shared(frozen_unet),) if group.shared is not None else ()
        unet_params = group.merge(unet_params, params[name], *extra)
    return unet_params


def text_groups(params: dict[str, Any]) -> list[str]:
    """The groups of a run's params that the text encoder reads, in the order they compose."""
    return [name for name in sorted(params) if group_of(name).text_call is not None]


def merged_text(params: dict[str, Any], text_params: Any) -> Any:
    """The text encoder's params one run (its params without the concept axis) amounts to: for
    sampling and exports, never inside the step."""
    for name in text_groups(params):
        text_params = group_of(name).text_merge(text_params, params[name])
    return text_params


class Passes:
    """The step's shared computations for the local concepts; `passes[name]` computes on first
    use. `needs` (the closure of what the present terms read) lets computations that can share a
    call (caption and y* through one encoder call, one U-Net call) do so."""

    def __init__(
        self, params: dict[str, Any], frozen: dict[str, Any], batch: Batch, data: ConceptData,
        schedule: NoiseSchedule, models: StepModels, needs: frozenset[str], data_shards: int,
    ):
        self.params, self.frozen, self.batch, self.data = params, frozen, batch, data
        self.schedule, self.models, self.needs = schedule, models, needs
        self.data_shards = data_shards
        self.num_concepts = batch.template.shape[0]
        self.rows = batch.timesteps.shape[0] // self.num_concepts  # b_l
        self._values: dict[str, jax.Array] = {}
        self._x_t: jax.Array | None = None

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self._values:
            COMPUTATIONS[name](self)
        return self._values[name]

    def per_concept(self, a: jax.Array) -> jax.Array:
        """[B, ...] -> [C_l, b_l, ...]."""
        return a.reshape((self.num_concepts, self.rows) + a.shape[1:])

    def pick(self, table: jax.Array) -> jax.Array:
        """Each concept's row of a per-template table [C_l, N, ...] for this step's template."""
        return jax.vmap(lambda t, i: t[i])(table, self.batch.template)

    @property
    def x_t(self) -> jax.Array:  # [B, h, w, c]
        if self._x_t is None:
            b = self.batch
            self._x_t = add_noise(self.schedule, b.x0, b.noise, b.timesteps)
        return self._x_t

    @property
    def prior_batch(self) -> Batch:
        if self.batch.prior_x0 is None:
            raise ValueError("prior preservation needs a class pool in the concept data "
                             "(core_jax.train.class_pool)")
        return self.batch

    @property
    def prior_inputs(self) -> tuple[jax.Array, jax.Array]:
        """The class rows' noisy latents [C_l, b_l, h, w, c] and timesteps [C_l, b_l]."""
        b = self.prior_batch
        x_t = add_noise(self.schedule, b.prior_x0, b.prior_noise, b.prior_timesteps)
        return self.per_concept(x_t), self.per_concept(b.prior_timesteps)

    def unet(
        self, contexts: list[jax.Array], with_stats: bool,
        inputs: list[tuple[jax.Array, jax.Array] | None] | None = None,
        pooled: list[jax.Array] | None = None, personalized: bool = True,
    ) -> list[tuple]:
        """The U-Net once per context [C_l, T, D] (every row of a concept takes its concept's
        context; SDXL: and its pooled embedding [C_l, P], and every row its view's add-time
        ids), all in one call, on this step's noisy latents or, where `inputs[k]` is given, on
        those (noisy latents [C_l, b_l, ...], timesteps [C_l, b_l]; not on SDXL, whose
        add-time ids come with this step's views). Returns per context (prediction
        [C_l, b_l, ...], attention statistics {"mean", "var"} each [C_l, L, b_l, T], or None);
        what no term reads of them XLA drops. `personalized` False: the frozen U-Net itself,
        whatever groups the runs have (PALP's teacher)."""
        unet, b = self.models.unet, self.batch
        n, rows, concepts = len(contexts), self.rows, self.num_concepts
        # Per-layer contexts [C_l, L, T, D], or per row [C_l, b_l, K, T, D] (K = L, or 2 L with
        # the values' own after the keys'): the others the same at every layer and row.
        num_layers = max((c.shape[-3] for c in contexts if c.ndim >= 4), default=0)
        if num_layers:
            contexts = [c if c.ndim >= 4 else jnp.broadcast_to(
                c[:, None], (c.shape[0], num_layers) + c.shape[1:]) for c in contexts]
        own = (self.per_concept(self.x_t), self.per_concept(b.timesteps))
        xs, ts = zip(*[own if i is None else i for i in (inputs or [None] * n)], strict=True)
        per_row = [c if c.ndim == 5 else jnp.broadcast_to(c[:, None], (concepts, rows)
                                                          + c.shape[1:]) for c in contexts]
        if pooled is not None:  # SDXL: the pooled embedding and add-time ids ride with the context
            if inputs is not None and any(i is not None for i in inputs):
                raise ValueError("SDXL's U-Net passes read the add-time ids of this step's "
                                 "views; other inputs have none")
            time_ids = self.per_concept(b.time_ids)  # [C_l, b_l, 6]
            per_row = [(c, jnp.broadcast_to(e[:, None], (concepts, rows) + e.shape[1:]), time_ids)
                       for c, e in zip(per_row, pooled, strict=True)]
        mutable = ["attn_stats"] if with_stats else False

        def apply(params: Any, x: jax.Array, t: jax.Array, ctx: Any):
            ctx, added = (ctx, {}) if pooled is None else (
                ctx[0], {"text_embeds": ctx[1], "time_ids": ctx[2]})
            if num_layers:  # ctx [rows, K, T, D]: layer k reads its own T tokens
                layers = self.models.attention_layers()
                with per_layer_contexts(layers, values_apart=num_layers != len(layers)):
                    out = unet.apply({"params": params}, x, t,
                                     join_layers(jnp.swapaxes(ctx, 0, 1)), mutable=mutable)
            else:
                out = unet.apply({"params": params}, x, t, ctx, mutable=mutable, **added)
            if not with_stats:
                return out, None
            return out[0], {kind: cross_attention_stats(out[1], kind) for kind in STAT_KINDS}

        groups = unet_groups(self.params) if personalized else []
        if groups:  # each concept's own call, concept-major rows, the frozen U-Net shared
            frozen_unet = self.frozen["unet"]
            shared = {name: self.frozen[name] for name in groups if name in self.frozen}

            def run(values: dict[str, Any], x: jax.Array, t: jax.Array, ctx: jax.Array):
                call = with_groups(lambda unet_params: apply(unet_params, x, t, ctx), values,
                                   shared)
                return call(frozen_unet)

            args = ({name: self.params[name] for name in groups},
                    jnp.concatenate(xs, axis=1), jnp.concatenate(ts, axis=1),
                    jax.tree.map(lambda *c: jnp.concatenate(c, axis=1), *per_row))
            if concepts == 1:  # one run: a plain call (vmap would batch a U-Net copy's kernels)
                out = run(*jax.tree.map(lambda a: a[0], args))
                pred, stats = jax.tree.map(lambda a: a[None], out)
            else:
                pred, stats = jax.vmap(run)(*args)  # [C, n b, ...], [C, L, n b, T]
            split = lambda a, k, axis: jax.lax.slice_in_dim(  # noqa: E731
                a, k * rows, (k + 1) * rows, axis=axis)
            return [(split(pred, k, 1), jax.tree.map(lambda s, k=k: split(s, k, 2), stats))
                    for k in range(n)]
        flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
        pred, stats = apply(
            self.frozen["unet"], jnp.concatenate([flat(x) for x in xs]),
            jnp.concatenate([flat(t) for t in ts]),
            jax.tree.map(lambda *c: jnp.concatenate([flat(a) for a in c]), *per_row),
        )  # [n B, ...], [L, n B, T] each
        size = concepts * rows

        def per_concept_stats(s: jax.Array, k: int) -> jax.Array:  # -> [C_l, L, b_l, T]
            s = s[:, k * size:(k + 1) * size]
            return s.reshape(s.shape[0], concepts, rows, -1).transpose(1, 0, 2, 3)

        return [(self.per_concept(pred[k * size:(k + 1) * size]),
                 jax.tree.map(lambda s, k=k: per_concept_stats(s, k), stats))
                for k in range(n)]


def timestep_probabilities(sampling: str, schedule: NoiseSchedule) -> jax.Array | None:
    """What `draw_batch` draws timesteps by for a stage's `timestep_sampling`: None (uniform) or
    TextBoost's SNR-weighted distribution [T]."""
    if sampling == "uniform":
        return None
    if sampling == "snr_weighted":
        return snr_weighted_timestep_probabilities(schedule)
    raise ValueError(f"timestep_sampling {sampling!r}; choose one of {TIMESTEP_SAMPLING}")


def _aligned_stats(stats: jax.Array, index: jax.Array) -> jax.Array:
    """[C, L, b, T] statistics at each concept's aligned context positions index [C, T]."""
    return jnp.take_along_axis(stats, index[:, None, None, :], axis=-1)


def _encode_per_run(p: Passes, ids: jax.Array, learned: jax.Array | None) -> jax.Array:
    """ids [C_l, n, T] encoded by each run's own text encoder (its text groups over the frozen
    one), with its learned vectors [C_l, V, D] where given: [C_l, n, T, D]."""
    groups = text_groups(p.params)
    frozen_text = p.frozen["text"]

    def one(values: dict[str, Any], ids: jax.Array, learned: jax.Array | None) -> jax.Array:
        slots = None if learned is None else placeholder_slots(ids, p.models.placeholder_ids)

        def call(text_params: Any) -> jax.Array:
            return p.models.encode({**p.frozen, "text": text_params}, ids, learned, slots)[0]

        for name in reversed(groups):
            use = group_of(name).text_call

            def call(text_params: Any, use=use, inner=call, value=values[name]) -> jax.Array:
                return use(inner, text_params, value)

        return call(frozen_text)

    values = {name: p.params[name] for name in groups}
    if learned is None:
        return jax.vmap(lambda v, i: one(v, i, None))(values, ids)
    return jax.vmap(one)(values, ids, learned)


def _caption_ids(p: Passes) -> jax.Array:
    """Each concept's caption [C, T]: its own where the caption names its class, else the one
    every concept shares."""
    if p.data.caption_ids is not None:
        return p.data.caption_ids
    caption = jnp.asarray(p.models.caption_ids)
    return jnp.broadcast_to(caption, (p.num_concepts, len(p.models.caption_ids)))


def _timestep_group(params: dict[str, Any]) -> str | None:
    """The run's group whose vectors depend on each row's timestep, if any."""
    return next((name for name in sorted(params) if group_of(name).timestep_vectors), None)


def _text_per_row(p: Passes, name: str) -> None:
    """The caption with each row's vectors at each layer (`ParamGroup.timestep_vectors`), one
    encoder call: caption_hidden [C, b, L, T, D], or [C, b, 2 L, T, D] with bypass vectors."""
    if "obj_hidden" in p.needs:
        raise ValueError("y* with vectors of each row's timestep (NeTI) is not built")
    if text_groups(p.params) or p.models.text_encoder_2 is not None:
        raise ValueError("vectors of each row's timestep need the one frozen text encoder")
    group = group_of(name)
    keys = None if p.batch.row_keys is None else p.per_concept(p.batch.row_keys)
    vectors, bypass = jax.vmap(group.timestep_vectors)(
        p.params[name], p.per_concept(p.batch.timesteps), keys)  # [C, b, L, V, D] each
    concepts, rows = vectors.shape[:2]
    flat = lambda a: a.reshape((concepts * rows,) + a.shape[2:])  # noqa: E731
    caption = _caption_ids(p)  # [C, T]
    ids = flat(jnp.broadcast_to(caption[:, None], (concepts, rows) + caption.shape[1:]))
    slots = placeholder_slots(ids, p.models.placeholder_ids)
    hidden, bypassed = encode_per_layer_with_bypass(
        p.models.text_encoder, p.frozen["text"], ids, flat(vectors), slots,
        None if bypass is None else flat(bypass), group.bypass)
    if bypassed is not None:
        hidden = jnp.concatenate([hidden, bypassed], axis=1)  # [C b, 2 L, T, D]
    p._values["caption_hidden"] = hidden.reshape((concepts, rows) + hidden.shape[1:])


def _text(p: Passes) -> None:
    """The caption and y* with the learned vectors, in one encoder call when both are needed."""
    timed = _timestep_group(p.params)
    if timed is not None:
        _text_per_row(p, timed)
        return
    m = p.models
    blocks = []
    if "caption_hidden" in p.needs:
        blocks.append(_caption_ids(p))
    if "obj_hidden" in p.needs:
        blocks.append(p.pick(p.data.obj_ids))
    names = [n for n in ("caption_hidden", "obj_hidden") if n in p.needs]
    if text_groups(p.params):  # each run's own encoder (SD 1.x/2.x only)
        if layer_vectors(p.params) is not None:
            raise ValueError("per-layer vectors (XTI) through an adapted text encoder are not "
                             "built")
        hidden = _encode_per_run(p, jnp.stack(blocks, axis=1), p.params.get("embeds"))
        for k, name in enumerate(names):
            p._values[name] = hidden[:, k]
        return
    ids = jnp.concatenate(blocks)  # [R, T]
    per_layer = layer_vectors(p.params)  # [C, L, V, D] or None
    learned = p.params.get("embeds") if per_layer is None else per_layer
    if learned is not None:
        learned = jnp.tile(learned, (len(blocks),) + (1,) * (learned.ndim - 1))  # [R, (L,) V, D]
    slots = placeholder_slots(ids, m.placeholder_ids) if learned is not None else None
    if per_layer is None:
        hidden, pooled = m.encode(p.frozen, ids, learned, slots)
    else:  # one encoding per cross-attention layer: [R, L, T, D]
        if m.text_encoder_2 is not None:
            raise ValueError("per-layer vectors need one text encoder (SD 1.x/2.x)")
        hidden = jnp.swapaxes(encode_per_layer(m.text_encoder, p.frozen["text"], ids, learned,
                                               slots), 0, 1)
        pooled = None
    for k, name in enumerate(names):
        rows = slice(k * p.num_concepts, (k + 1) * p.num_concepts)
        p._values[name] = hidden[rows]
        if pooled is not None:  # SDXL
            p._values[name.replace("hidden", "pooled")] = pooled[rows]


def _phrases(p: Passes) -> None:
    """ClassDiffusion's phrases encoded in one call: "a photo of a S* <cls>" with the learned
    vectors, "a photo of a <cls>" as a constant (the code's frozen class branch)."""
    ids = p.data.phrase_ids
    if ids is None:
        raise ValueError("a term reads phrase_hidden but the concept data has no phrases "
                         "(build_concept_data(with_phrases=True))")
    if text_groups(p.params):
        hidden = _encode_per_run(p, ids, p.params.get("embeds"))  # [C_l, 2, T, D]
        p._values["phrase_hidden"] = jnp.stack(
            [hidden[:, 0], jax.lax.stop_gradient(hidden[:, 1])], axis=1)
        return
    ids = ids.reshape((-1, ids.shape[-1]))  # [2 C_l, T], concept-major
    learned = p.params.get("embeds")
    slots = None
    if learned is not None:
        learned = jnp.repeat(learned, 2, axis=0)  # [2 C_l, V, D]
        slots = placeholder_slots(ids, p.models.placeholder_ids)
    hidden, _ = p.models.encode(p.frozen, ids, learned, slots)
    hidden = hidden.reshape((p.num_concepts, 2) + hidden.shape[1:])  # [C_l, 2, T, D]
    p._values["phrase_hidden"] = jnp.stack(
        [hidden[:, 0], jax.lax.stop_gradient(hidden[:, 1])], axis=1)


def _unet_passes(p: Passes) -> None:
    """The caption pass (diffusion; its attention statistics when a term reads them), the y*
    pass (attention statistics) and the class pass (prior preservation) share one call."""
    caption_stats = any(n in p.needs for n in CAPTION_STATS)
    names = [n for n in ("caption_pred", "obj_stats", "prior_pred")
             if n in p.needs or (n == "caption_pred" and caption_stats)]
    contexts = {"caption_pred": lambda: p["caption_hidden"], "obj_stats": lambda: p["obj_hidden"],
                "prior_pred": lambda: p.data.class_hidden}
    inputs = [p.prior_inputs if n == "prior_pred" else None for n in names]
    hidden = [contexts[n]() for n in names]  # the text pass sets SDXL's pooled embeddings too
    pooled = None
    if p.models.text_encoder_2 is not None:  # SDXL (prior preservation is refused there)
        pooled_of = {"caption_pred": "caption_pooled", "obj_stats": "obj_pooled"}
        pooled = [p._values[pooled_of[n]] for n in names]
    results = p.unet(hidden, with_stats="obj_stats" in p.needs or caption_stats, inputs=inputs,
                     pooled=pooled)
    for name, (pred, stats) in zip(names, results, strict=True):
        if name == "obj_stats":
            p._values[name] = _aligned_stats(stats["mean"], p.pick(p.data.obj_index))
        else:
            p._values[name] = pred
        if name == "caption_pred" and caption_stats:
            for stat_name, kind in CAPTION_STATS.items():
                p._values[stat_name] = stats[kind]


def _cat_stats(p: Passes) -> None:
    """The y_cat pass: forward only, a constant target."""
    pooled = None if p.data.cat_pooled is None else [p.pick(p.data.cat_pooled)]
    [(_, stats)] = p.unet([p.pick(p.data.cat_hidden)], with_stats=True, pooled=pooled)
    p._values["cat_stats"] = jax.lax.stop_gradient(
        _aligned_stats(stats["mean"], p.pick(p.data.cat_index))
    )


def _caption_placeholders(p: Passes) -> jax.Array:
    """Where each concept's caption holds the placeholder tokens: [C, T] bool."""
    return jnp.isin(_caption_ids(p), jnp.asarray(p.models.placeholder_ids))


def _span_mean(hidden: jax.Array, span: jax.Array) -> jax.Array:
    """[C, T, D] encodings averaged over each concept's span [C, T] bool: [C, D]."""
    weights = span.astype(hidden.dtype)
    return jnp.einsum("ctd,ct->cd", hidden, weights) / jnp.maximum(
        jnp.sum(weights, axis=1, keepdims=True), 1.0)


def _obj_concept(p: Passes) -> jax.Array:
    """S*'s encoding in y*: the mean over its placeholder tokens. [C, D]"""
    ids = p.pick(p.data.obj_ids)  # [C, T]
    span = jnp.isin(ids, jnp.asarray(p.models.placeholder_ids))
    return _span_mean(p["obj_hidden"], span)


def cat_concept_span(cat_index: jax.Array, context_mask: jax.Array) -> jax.Array:
    """Where the super-category word lies in y_cat: the positions before its first end-of-text
    that are not context tokens (the context ends with that end-of-text). [..., T] bool from
    the aligned context positions `cat_index` [..., T] and `context_mask` [..., T]."""
    positions = jnp.arange(cat_index.shape[-1])
    eos = jnp.max(jnp.where(context_mask, cat_index, 0), axis=-1, keepdims=True)
    at = (cat_index[..., None, :] == positions[:, None]) & context_mask[..., None, :]
    in_context = jnp.any(at, axis=-1)  # [..., T] by position
    return (positions < eos) & ~in_context


def _cat_concept(p: Passes) -> jax.Array:
    """The super-category word's encoding in y_cat, the mean over its span: [C, D], a
    constant."""
    span = cat_concept_span(p.pick(p.data.cat_index), p.pick(p.data.context_mask))
    return _span_mean(p.pick(p.data.cat_hidden), span)


def _knowledge(p: Passes) -> None:
    """TextBoost's prior prompts of this step's rows: encoded by each run's encoder, and the
    frozen encoder's encodings of them (constants). [C_l, b_l, T, D] each."""
    if p.data.kp_ids is None or p.batch.kp_index is None:
        raise ValueError("a term reads kp_hidden but the concept data has no prior prompts "
                         "(build_concept_data(knowledge_prompts=...))")
    index = p.per_concept(p.batch.kp_index)  # [C_l, b_l]
    take = jax.vmap(lambda table, i: table[i])
    ids = take(p.data.kp_ids, index)  # [C_l, b_l, T]
    if text_groups(p.params):
        hidden = _encode_per_run(p, ids, None)
    else:
        flat, _ = p.models.encode(p.frozen, ids.reshape((-1, ids.shape[-1])), None, None)
        hidden = flat.reshape(ids.shape + flat.shape[-1:])
    p._values["kp_hidden"] = hidden
    p._values["kp_frozen"] = take(p.data.kp_frozen, index)


def _flat(a: jax.Array) -> jax.Array:
    """[C_l, b_l, ...] -> [C_l * b_l, ...] (concept-major rows, as the batch's)."""
    return a.reshape((-1,) + a.shape[2:])


def _palp_x0(p: Passes) -> jax.Array:
    """x^_0 = the clean latents the caption pass's prediction implies at this step's x_t (PALP's
    Eq. 2), with its gradient. [C_l, b_l, h, w, c]"""
    x0, _ = denoised(p.schedule, _flat(p["caption_pred"]), p.x_t, p.batch.timesteps)
    return p.per_concept(x0)


def _palp_pair(p: Passes, context: jax.Array, personalized: bool) -> jax.Array:
    """The noise [C_l, 2, b_l, h, w, c] the U-Net predicts at x^_t (x^_0 noised again with each
    row's own noise and timestep: PALP's "same noise" variant), unconditionally and with
    `context` [C_l, T, D]; constants."""
    b = p.batch
    x_hat = jax.lax.stop_gradient(add_noise(p.schedule, _flat(p["palp_x0"]), b.noise,
                                            b.timesteps))
    inputs = (p.per_concept(x_hat), p.per_concept(b.timesteps))
    if p.data.null_hidden is None:
        raise ValueError("a term reads PALP's passes but the concept data has no target prompt "
                         "(build_concept_data(target_prompts=...))")
    results = p.unet([p.data.null_hidden, context], with_stats=False, inputs=[inputs, inputs],
                     personalized=personalized)
    eps = [p.per_concept(denoised(p.schedule, _flat(pred), x_hat, b.timesteps)[1])
           for pred, _ in results]
    return jax.lax.stop_gradient(jnp.stack(eps, axis=1))


def _loss_mask(p: Passes) -> jax.Array:
    if p.batch.mask is None:
        raise ValueError("a term reads loss_mask but the concept data has no view masks; make "
                         "the latent pool with data.augmentation = 'custom_diffusion'")
    return p.per_concept(p.batch.mask)


def _set(name: str, fn: Callable[[Passes], jax.Array]) -> Callable[[Passes], None]:
    def compute(p: Passes) -> None:
        p._values[name] = fn(p)

    return compute


def _aligned(hidden: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(hidden, index[..., None], axis=1)


COMPUTATIONS: dict[str, Callable[[Passes], None]] = {
    "embeds": _set("embeds", lambda p: p.params["embeds"]),
    "super_embed": _set("super_embed", lambda p: p.data.super_embed),
    "target": _set("target", lambda p: p.per_concept(training_target(
        p.schedule, p.batch.x0, p.batch.noise, p.batch.timesteps))),
    "snr": _set("snr", lambda p: p.per_concept(snr(p.schedule, p.batch.timesteps))),
    "caption_hidden": _text,
    "obj_hidden": _text,
    "obj_aligned": _set("obj_aligned", lambda p: _aligned(p["obj_hidden"],
                                                          p.pick(p.data.obj_index))),
    "cat_aligned": _set("cat_aligned", lambda p: _aligned(p.pick(p.data.cat_hidden),
                                                          p.pick(p.data.cat_index))),
    "context_mask": _set("context_mask", lambda p: p.pick(p.data.context_mask)),
    "obj_concept": _set("obj_concept", _obj_concept),
    "cat_concept": _set("cat_concept", _cat_concept),
    "caption_pred": _unet_passes,
    "caption_stats": _unet_passes,
    "caption_stats_var": _unet_passes,
    "caption_placeholders": _set("caption_placeholders", _caption_placeholders),
    "obj_stats": _unet_passes,
    "prior_pred": _unet_passes,
    "prior_target": _set("prior_target", lambda p: p.per_concept(training_target(
        p.schedule, p.prior_batch.prior_x0, p.batch.prior_noise, p.batch.prior_timesteps))),
    "cat_stats": _cat_stats,
    "loss_mask": _set("loss_mask", _loss_mask),
    "phrase_hidden": _phrases,
    "kp_hidden": _knowledge,
    "kp_frozen": _knowledge,
    "phrase_ids": _set("phrase_ids", lambda p: p.data.phrase_ids),
    "palp_x0": _set("palp_x0", _palp_x0),
    "palp_teacher": _set("palp_teacher", lambda p: _palp_pair(p, p.data.target_hidden, False)),
    "palp_student": _set("palp_student", lambda p: _palp_pair(p, p["caption_hidden"], True)),
    "data_shards": _set("data_shards", lambda p: jnp.full((p.num_concepts,), p.data_shards,
                                                          jnp.float32)),
}

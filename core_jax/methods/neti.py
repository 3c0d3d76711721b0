"""NeTI, Neural Textual Inversion (Alaluf et al., "A Neural Space-Time Representation for
Text-to-Image Personalization", arXiv 2305.15391): S*'s vector is the output of a small network
of the denoising timestep t and the U-Net's cross-attention layer l, trained with the diffusion
loss.

Read from the official code (github.com/NeuralTextualInversion/NeTI at 28edf30:
`models/neti_mapper.py`, `models/positional_encoding.py`, `models/neti_clip_text_encoder.py`,
`models/xti_attention_processor.py`, `training/coach.py`, `training/config.py`):

- Positional encoding: F = 1024 random frequencies w [F, 2] ~ N(0, 1) scaled per column by
  (sigma_t 0.03, sigma_l 2.0), drawn once per run and never trained; x = (t, l) with t the raw
  timestep (0..999) and l the layer's index (0..15, down blocks, mid, up blocks);
  e(t, l) = [sin(w x), cos(w x)] / ||.||, a unit vector of 2F = 2048.
- Mapper: Linear(2048 -> A L = 160), its kernel set to the encodings of the anchors
  (t in 0, 100, ..., 900 (A = 10 time anchors, t-major) x l in 0..15), so its first layer reads
  the similarity of (t, l) to each anchor; then Linear(160 -> 128) + LayerNorm + LeakyReLU,
  Linear(128 -> 128) + LayerNorm + LeakyReLU, then Linear(128 -> 2 D). All of it trains, the
  anchors' layer included (the code optimizes `mapper.parameters()`); torch's default
  initialization elsewhere (uniform +-1/sqrt(fan_in) for kernels and biases).
- Output normalized to the norm of the super-category token's input embedding. With the textual
  bypass the code normalizes the whole 2 D output (`F.normalize(dim=-1)` before splitting), so
  the token half's norm is below that norm; this module does the same.
- Nested dropout (training only): with probability p = 0.5 per mapper call, each row's 128
  hidden units from a uniformly drawn index in [0, 128) on are zeroed (index 0 zeroes all of
  them) before the output layer. The code draws that coin once per call, i.e. per layer for
  the micro-batch's rows; here it is drawn per (row, layer), so a row's randomness depends on
  its own key alone and any split of rows over devices draws the same numbers. At sampling no
  truncation by default (the code's `truncation_idx=None`); `core-jax sample
  --neti_truncation K` zeroes units K.. at every step and layer, as the code's inference-time
  `truncation_idx` (read in a NeTI-derived mapper's `apply_nested_dropout`; NeTI's own file not
  fetched here), trading fidelity for editability.
- Textual bypass (the second half b of the output): added to S*'s position of the text
  encoder's last hidden state BEFORE the final layer norm, h <- h + 0.2 (b / ||b||) ||h||, and
  only the cross-attention VALUES read that encoding; the keys read the encoding without it
  (`XTIAttenProc`: `key = to_k(_ehs)`, `value = to_v(_ehs_bypass)`). Here the U-Net's context
  carries 2 L encodings and `core_jax.layer_contexts.per_layer_contexts(values_apart=True)`
  gives each `attn2`'s `to_v` its own.
- Training: the mapper only (text encoder, U-Net and the token table frozen), diffusion loss,
  uniform timesteps; SD v1.4, 1000 steps, batch 2 x gradient accumulation 4, lr 1e-3 with
  scale_lr (x 8 images per update: 8e-3), AdamW betas (0.9, 0.999), weight decay 1e-2, eps
  1e-8, constant schedule. Here: batch 8 in one step (the same mean gradient), lr 8e-3.

How it fits the step: the group "neti" holds one run's mapper (every leaf [C, ...], so C runs
pack on the concept axis) and its constants (frequencies, target norm, dropout probability,
layer indices) under "constants": read under `stop_gradient`, and a hook puts them back after
each update so weight decay cannot move them. `ParamGroup.timestep_vectors` turns (value, the
rows' timesteps [b], row keys) into S*'s vectors [b, L, 1, D] and bypass vectors; the caption
pass then encodes per row and per layer (b L encodings per concept: each row has its own
timestep) and the U-Net's row r, layer k reads encoding (r, k) (`core_jax.train.passes`).

Refused in one line: sharing a stage with methods that read y*'s or the caption's one encoding
or S*'s one vector (CoRe, the thesis terms, ClassDiffusion's phrases), hooks, text-encoder
groups, other per-layer groups (XTI), and SDXL (the code builds SD 1.x's one encoder only); S*
of more than one vector (the code asserts one placeholder token).

[UNVERIFIED] The paper's text was not read here (only the code); where the paper says the
output is normalized to the super-category norm, the code's joint normalization with the
bypass is what runs. The frequencies are drawn from each run's group key, not torch's global
RNG, so runs are reproducible but not bit-equal to the code's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from core_jax.errors import InputError
from core_jax.methods.base import Hook, Method, ParamGroup, Settings, Term
from core_jax.methods.diffusion_term import DEFAULTS as DIFFUSION_DEFAULTS
from core_jax.methods.diffusion_term import diffusion_term
from core_jax.methods.xti import SINGLE_VECTOR_INPUTS

GROUP = "neti"
NUM_FREQUENCIES = 1024  # the code's `num_w`
TIMESTEP_RANGE = 1000  # the code's anchors span range(0, 1000, 1000 // A)
BYPASS_SCALE = 0.2  # the code's constant
LEAKY_SLOPE = 0.01  # torch's LeakyReLU default
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default
LEARNING_RATE = 8e-3  # 1e-3 x (batch 2 x accumulation 4), the code's scale_lr
STEPS = 1000
BATCH_SIZE = 8

DEFAULTS = {
    **DIFFUSION_DEFAULTS,
    "neti_sigma_t": 0.03,
    "neti_sigma_l": 2.0,
    "neti_time_anchors": 10,
    "neti_hidden": 128,
    "neti_nested_dropout": 0.5,
    "neti_bypass": True,
}


# --- The mapper, one run ------------------------------------------------------------------------

def positional_encoding(frequencies: jax.Array, timesteps: jax.Array, layers: jax.Array
                        ) -> jax.Array:
    """[sin(w x), cos(w x)] / its norm for x = (t, l): frequencies [F, 2], timesteps and layer
    indices broadcastable to [...] -> [..., 2F]."""
    timesteps, layers = jnp.broadcast_arrays(jnp.asarray(timesteps, jnp.float32),
                                             jnp.asarray(layers, jnp.float32))
    phase = jnp.stack([timesteps, layers], axis=-1) @ frequencies.T  # [..., F]
    v = jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def anchor_kernel(frequencies: jax.Array, num_time_anchors: int, num_layers: int) -> jax.Array:
    """The first layer's kernel [2F, A L]: column a L + l is the encoding of anchor
    (a * (1000 // A), l), time-major as the code stacks them."""
    t = jnp.arange(num_time_anchors) * (TIMESTEP_RANGE // num_time_anchors)
    tt, ll = jnp.meshgrid(t, jnp.arange(num_layers), indexing="ij")
    return positional_encoding(frequencies, tt.reshape(-1), ll.reshape(-1)).T


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """torch.nn.Linear's default initialization: kernel and bias uniform in +-1/sqrt(fan_in)."""
    bound = fan_in ** -0.5
    k_kernel, k_bias = jax.random.split(key)
    return {"kernel": jax.random.uniform(k_kernel, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_bias, (fan_out,), jnp.float32, -bound, bound)}


def init_mapper(
    key: jax.Array, target_norm: jax.Array, *, num_layers: int, width: int,
    sigma_t: float = 0.03, sigma_l: float = 2.0, num_time_anchors: int = 10, hidden: int = 128,
    nested_dropout: float = 0.5, bypass: bool = True, num_frequencies: int = NUM_FREQUENCIES,
) -> dict[str, Any]:
    """One run's mapper: trained layers and its "constants" (frequencies [F, 2], the target
    norm, the dropout probability, layer indices [L])."""
    keys = jax.random.split(key, 6)
    frequencies = jax.random.normal(keys[0], (num_frequencies, 2)) * jnp.asarray(
        [sigma_t, sigma_l], jnp.float32)
    anchors = num_time_anchors * num_layers
    first = _dense(keys[1], 2 * num_frequencies, anchors)
    value = {
        "constants": {
            "frequencies": frequencies,
            "norm": jnp.asarray(target_norm, jnp.float32),
            "dropout": jnp.asarray(nested_dropout, jnp.float32),
            "layers": jnp.arange(num_layers, dtype=jnp.float32),
        },
        "input": {**first, "kernel": anchor_kernel(frequencies, num_time_anchors, num_layers)},
        "hidden_0": _dense(keys[2], anchors, hidden),
        "norm_0": {"scale": jnp.ones((hidden,)), "bias": jnp.zeros((hidden,))},
        "hidden_1": _dense(keys[3], hidden, hidden),
        "norm_1": {"scale": jnp.ones((hidden,)), "bias": jnp.zeros((hidden,))},
    }
    # The code's one Linear(128 -> 2 D) as two halves (same initialization: fan_in 128 both).
    output = _dense(keys[4], hidden, 2 * width if bypass else width)
    value["output"] = {"kernel": output["kernel"][:, :width], "bias": output["bias"][:width]}
    if bypass:
        value["bypass"] = {"kernel": output["kernel"][:, width:], "bias": output["bias"][width:]}
    return value


def _layer_norm(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * p["scale"] + p["bias"]


def _apply_dense(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def mapper_hidden(value: Mapping[str, Any], timesteps: jax.Array, layers: jax.Array
                  ) -> jax.Array:
    """The representation before the output layer [..., H] of (t, l) broadcast to [...]."""
    frequencies = jax.lax.stop_gradient(value["constants"]["frequencies"])
    h = _apply_dense(positional_encoding(frequencies, timesteps, layers), value["input"])
    for k in range(2):
        h = _apply_dense(h, value[f"hidden_{k}"])
        h = jax.nn.leaky_relu(_layer_norm(h, value[f"norm_{k}"]), LEAKY_SLOPE)
    return h


def mapper_outputs(
    value: Mapping[str, Any], timesteps: jax.Array, layers: jax.Array,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """S*'s vector [..., D] and the bypass vector [..., D] (None without a bypass) for (t, l)
    broadcast to [...]. `keep` [...]: how many hidden units survive nested dropout (H: all);
    None: no dropout. The output (both halves together) has the constants' norm."""
    h = mapper_hidden(value, timesteps, layers)
    if keep is not None:
        h = h * (jnp.arange(h.shape[-1]) < keep[..., None])
    token = _apply_dense(h, value["output"])
    norm = jax.lax.stop_gradient(value["constants"]["norm"])
    if "bypass" not in value:
        return token / jnp.linalg.norm(token, axis=-1, keepdims=True) * norm, None
    bypass = _apply_dense(h, value["bypass"])
    joint = jnp.sqrt(jnp.sum(jnp.square(token), -1, keepdims=True)
                     + jnp.sum(jnp.square(bypass), -1, keepdims=True))
    return token / joint * norm, bypass / joint * norm


def nested_dropout_keep(key: jax.Array, probability: jax.Array, hidden: int) -> jax.Array:
    """How many of `hidden` units one (row, layer) keeps: all with probability 1 - p, else a
    uniform index in [0, hidden)."""
    k_coin, k_index = jax.random.split(key)
    index = jax.random.randint(k_index, (), 0, hidden)
    return jnp.where(jax.random.bernoulli(k_coin, probability), index, hidden)


def timestep_vectors(
    value: Mapping[str, Any], timesteps: jax.Array, row_keys: jax.Array | None,
    truncation: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """S*'s vectors [b, L, 1, D] and bypass vectors [b, L, 1, D] (or None) for each row's
    timestep [b] at every layer; `row_keys` [b, 2] (raw) draw nested dropout per (row, layer),
    None: none (sampling). `truncation` (sampling only, an int scalar k): the code's
    `truncation_idx`, the hidden representation's units from k on zeroed at every (row,
    layer), as nested dropout trained the mapper to allow (k = H: no truncation)."""
    layers = jax.lax.stop_gradient(value["constants"]["layers"])  # [L]
    keep = None
    if truncation is not None:
        if row_keys is not None:
            raise ValueError("truncation is for sampling; training draws nested dropout")
        keep = jnp.broadcast_to(jnp.asarray(truncation, jnp.int32),
                                (timesteps.shape[0], layers.shape[0]))
    if row_keys is not None:
        hidden = value["hidden_1"]["bias"].shape[-1]
        probability = jax.lax.stop_gradient(value["constants"]["dropout"])
        keep = jax.vmap(lambda k: jax.vmap(lambda layer: nested_dropout_keep(
            jax.random.fold_in(jax.random.wrap_key_data(k), layer), probability, hidden))(
                jnp.arange(layers.shape[0])))(row_keys)  # [b, L]
    token, bypass = mapper_outputs(value, timesteps[:, None], layers[None, :], keep)
    return token[:, :, None], None if bypass is None else bypass[:, :, None]


def apply_bypass(states: jax.Array, bypass: jax.Array) -> jax.Array:
    """The code's textual bypass on S*'s encoder states before the final layer norm:
    h + 0.2 (b / ||b||) ||h||, over the last axis."""
    unit = bypass / jnp.linalg.norm(bypass, axis=-1, keepdims=True)
    return states + BYPASS_SCALE * unit * jnp.linalg.norm(states, axis=-1, keepdims=True)


# --- The method ---------------------------------------------------------------------------------

def _init_group(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> dict[str, Any]:
    """Each run's mapper [C, ...], normalized to its super-category word's embedding norm."""
    if settings.attention_layers is None:
        raise ValueError("neti needs the U-Net's cross-attention layers (Settings)")
    if num_vectors != 1:
        raise InputError(f"neti maps (t, l) to one token's vector; concept.num_vectors is "
                         f"{num_vectors} (set it to 1)")
    s = settings.stage
    norms = jnp.linalg.norm(data.super_embed, axis=-1)  # [C]

    def one(key: jax.Array, norm: jax.Array) -> dict[str, Any]:
        return init_mapper(
            jax.random.wrap_key_data(key), norm, num_layers=len(settings.attention_layers()),
            width=data.super_embed.shape[-1], sigma_t=s["neti_sigma_t"],
            sigma_l=s["neti_sigma_l"], num_time_anchors=s["neti_time_anchors"],
            hidden=s["neti_hidden"], nested_dropout=s["neti_nested_dropout"],
            bypass=bool(s["neti_bypass"]))

    return jax.vmap(one)(keys, norms)


def _check_stage(settings: Settings) -> None:
    """One line for a stage NeTI cannot run in (see the module docstring)."""
    from core_jax.methods import get_method  # the registry imports this module

    if len(settings.encoder_widths) > 1:
        raise InputError("neti needs one text encoder (SD 1.x/2.x); SDXL's two are not built")
    for name in settings.stage.get("methods", ()):
        method = get_method(name)
        if method.name == METHOD.name:
            continue
        # Groups first: a method with vectors of its own (XTI) checks its stage in its terms.
        clash = sorted(({"embeds"} & set(method.trains))
                       | {g for g, group in method.groups.items()
                          if group.text_call or group.layer_vectors or group.timestep_vectors})
        if not clash:
            reads = {i for term in method.terms(settings) for i in term.inputs}
            clash = sorted(reads & SINGLE_VECTOR_INPUTS)
        if clash or method.hooks(settings):
            raise InputError(
                f"neti cannot share a stage with {name}: it reads S*'s one vector or one "
                f"encoding of a prompt, or adds its own ({', '.join(clash) or 'hooks'}), and "
                "neti's vary with each row's timestep and layer; train them as separate runs "
                "(a sweep's settings)")


def _terms(settings: Settings) -> tuple[Term, ...]:
    _check_stage(settings)
    return (diffusion_term(settings),)


def _hooks(settings: Settings) -> tuple[Hook, ...]:
    """The constants stay as they began (weight decay would shrink them otherwise)."""

    def init(params: dict) -> Any:  # a copy: the state's params and carry are donated apart
        return jax.tree.map(jnp.copy, params[GROUP]["constants"])

    def hold(params: dict, carry: Any, step: jax.Array, numbers) -> tuple[dict, Any]:
        return {**params, GROUP: {**params[GROUP], "constants": carry}}, carry

    return (Hook("neti_constants", init, hold),)


NETI = ParamGroup(init=_init_group, timestep_vectors=timestep_vectors, bypass=apply_bypass)

METHOD = Method(
    name="neti",
    summary="learn a mapper (timestep, cross-attention layer) -> S*'s vector with nested "
            "dropout and the textual bypass, diffusion loss (NeTI)",
    defaults=DEFAULTS,
    source="github.com/NeuralTextualInversion/NeTI (code, 28edf30); METHODS.md 5",
    trains={GROUP: "learning_rate"},
    groups={GROUP: NETI},
    terms=_terms,
    hooks=_hooks,
)

METHODS = (METHOD,)

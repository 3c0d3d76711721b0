"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the frozen U-Net, S* frozen: a light stage 2.

Each targeted linear layer `y = x W + b` becomes `y + scale * (x A) B`, A [in, r], B [r, out],
scale = alpha / r. Only A and B train and live in the state (the group "lora", [C, ...] per
packed run); the frozen U-Net stays one shared copy, never copied or merged inside the step:
`flax.linen.intercept_methods` adds the low-rank term to the outputs of the targeted `Dense`
modules, found by their module path, so the models carry no training logic.

Keys (stage config):
- `lora_rank` r and `lora_alpha`: scale = alpha / r. Defaults r = 4, alpha = r (scale 1), as
  diffusers' `train_dreambooth_lora.py` (`LoraConfig(r=args.rank, lora_alpha=args.rank)`).
- `lora_targets`: module names in diffusers' spelling; a module is targeted when its dotted name
  equals a target or ends with "." + target (peft's rule for a list of names). Default: the
  attention projections `to_q`, `to_k`, `to_v`, `to_out.0` of every attention layer (self and
  cross), as that script; add `FEED_FORWARD` (`ff.net.0.proj`, `ff.net.2`) for the
  feed-forward layers. Only linear layers can be targeted.
- Initialisation as peft's default (`init_lora_weights=True`): B = 0, so training starts at the
  frozen model exactly, and A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
  (diffusers' script asks for peft's "gaussian" A instead.) Dropout 0.
- The stage's `learning_rate` is the adapters'; diffusers' DreamBooth-LoRA README trains at 1e-4.

Exports (`core_jax.export.save_lora`): peft/diffusers names for `load_lora_weights`, and the
kohya names that AUTOMATIC1111 and ComfyUI read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from core_jax.errors import InputError
from core_jax.methods.base import Method, ParamGroup, Settings, UNetCall
from core_jax.methods.diffusion_term import DEFAULTS as DIFFUSION_DEFAULTS
from core_jax.methods.diffusion_term import diffusion_only
from core_jax.weights import path_to_torch_key

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
DEFAULTS = {**DIFFUSION_DEFAULTS, "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ATTENTION}


@flax.struct.dataclass
class LoraAdapters:
    """The adapters of a run: `layers` mirrors the U-Net's params down to each targeted module,
    whose entry is {"A": [in, r], "B": [r, out]} (leading [C] in the train state). `scale`
    (alpha / r) is static, so it rides along in checkpoints and exports without training."""

    layers: dict[str, Any]
    scale: float = flax.struct.field(pytree_node=False)

    def modules(self) -> dict[tuple[str, ...], dict[str, Any]]:
        """Module path -> {"A", "B"} for every adapted module, in path order."""
        flat = traverse_util.flatten_dict(self.layers)
        paths = sorted({path[:-1] for path in flat})
        return {path: {"A": flat[path + ("A",)], "B": flat[path + ("B",)]} for path in paths}


def module_name(path: Sequence[str]) -> str:
    """A module's Flax path as diffusers names it: ("up_blocks_1", "attentions_0", ...,
    "to_out_0") -> "up_blocks.1.attentions.0. ... .to_out.0"."""
    return path_to_torch_key((*path, "kernel")).removesuffix(".weight")


def _targeted(name: str, targets: Sequence[str]) -> str | None:
    return next((t for t in targets if name == t or name.endswith("." + t)), None)


def target_paths(
    unet_params: Mapping[str, Any], targets: Sequence[str], model: str = "U-Net",
    examples: Sequence[str] = ATTENTION + FEED_FORWARD,
) -> list[tuple[str, ...]]:
    """The paths of the linear layers (2-D kernels) of `unet_params` (a `model`'s) that
    `targets` name; a target that names none is an error (a typo would otherwise train nothing
    there)."""
    if isinstance(targets, str):
        targets = (targets,)
    found, used = [], set()
    for path, leaf in traverse_util.flatten_dict(unet_params).items():
        if path[-1] != "kernel" or np.ndim(leaf) != 2:
            continue
        target = _targeted(module_name(path[:-1]), targets)
        if target is not None:
            found.append(path[:-1])
            used.add(target)
    unused = [t for t in targets if t not in used]
    if unused or not targets:
        raise InputError(f"lora_targets {unused or list(targets)} name no linear layer of the "
                         f"{model}; e.g. {', '.join(examples)}")
    return sorted(found)


def init_adapters(
    unet_params: Mapping[str, Any], rank: int, alpha: float, targets: Sequence[str],
    key: jax.Array,
) -> LoraAdapters:
    """One run's first adapters: B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform
    with a = sqrt(5): gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in))."""
    if not (isinstance(rank, int) and rank >= 1):
        raise InputError(f"lora_rank is {rank!r}; give a whole number >= 1")
    if not alpha > 0:
        raise InputError(f"lora_alpha is {alpha!r}; give a positive number")
    paths = target_paths(unet_params, targets)
    kernels = traverse_util.flatten_dict(unet_params)
    flat = {}
    for path, k in zip(paths, jax.random.split(key, len(paths)), strict=True):
        fan_in, fan_out = kernels[path + ("kernel",)].shape
        bound = 1.0 / np.sqrt(fan_in)
        flat[path + ("A",)] = jax.random.uniform(k, (fan_in, rank), jnp.float32, -bound, bound)
        flat[path + ("B",)] = jnp.zeros((rank, fan_out), jnp.float32)
    return LoraAdapters(traverse_util.unflatten_dict(flat), scale=float(alpha) / rank)


def _init_group(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> LoraAdapters:
    """The C packed runs' first adapters, each from its own key."""
    stage = settings.stage

    def one(key: jax.Array) -> LoraAdapters:
        return init_adapters(frozen["unet"], stage["lora_rank"], stage["lora_alpha"],
                             stage["lora_targets"], jax.random.wrap_key_data(key))

    return jax.vmap(one)(keys)


def _layer(layers: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any] | None:
    node: Any = layers
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) and "A" in node else None


def adapted_call(call: UNetCall, unet_params: Any, adapters: LoraAdapters) -> Any:
    """`call(unet_params)` with every adapted `Dense` output y replaced by
    y + scale * (x A) B (peft's order: the low-rank product, then the scale)."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return out
        layer = _layer(adapters.layers, context.module.path)
        if layer is None:
            return out
        dtype = out.dtype  # the module's compute dtype (bf16 under mixed precision)
        low_rank = (args[0].astype(dtype) @ layer["A"].astype(dtype)) @ layer["B"].astype(dtype)
        return out + low_rank * adapters.scale

    with nn.intercept_methods(intercept):
        return call(unet_params)


def merge(unet_params: Any, adapters: LoraAdapters) -> Any:
    """The U-Net params with W + scale * A B in every adapted kernel (for sampling and merged
    exports; the step never merges)."""
    flat = traverse_util.flatten_dict(unet_params)
    for path, layer in adapters.modules().items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = kernel + adapters.scale * (layer["A"] @ layer["B"])
    return traverse_util.unflatten_dict(flat)


def peft_state_dict(adapters: LoraAdapters, prefix: str = "unet") -> dict[str, np.ndarray]:
    """diffusers' names for `load_lora_weights` (`<prefix>.<module>.lora_A.weight` [r, in],
    `lora_B.weight` [out, r], torch's layout; prefix "unet" or "text_encoder"). Such files carry
    no alpha (diffusers then reads alpha = r, scale 1), so the scale is folded into B: the same
    W + scale A B."""
    out = {}
    for path, layer in adapters.modules().items():
        name = f"{prefix}.{module_name(path)}"
        out[f"{name}.lora_A.weight"] = np.asarray(layer["A"], np.float32).T
        out[f"{name}.lora_B.weight"] = (adapters.scale * np.asarray(layer["B"], np.float32)).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def kohya_state_dict(adapters: LoraAdapters) -> dict[str, np.ndarray]:
    """kohya's names (AUTOMATIC1111, ComfyUI): `lora_unet_<module with _>.lora_down.weight`
    [r, in], `.lora_up.weight` [out, r] and `.alpha` (scale = alpha / r)."""
    out = {}
    for path, layer in adapters.modules().items():
        name = "lora_unet_" + module_name(path).replace(".", "_")
        a = np.asarray(layer["A"], np.float32)
        out[f"{name}.lora_down.weight"] = a.T
        out[f"{name}.lora_up.weight"] = np.asarray(layer["B"], np.float32).T
        out[f"{name}.alpha"] = np.asarray(adapters.scale * a.shape[1], np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_checkpoint(tree: Mapping[str, Any], rank: int, alpha: float) -> LoraAdapters:
    """Adapters from a checkpoint restored without a target ({"layers": ...}; the scale, a
    static field, comes from the stage's rank and alpha)."""
    return LoraAdapters(tree["layers"], scale=float(alpha) / rank)


LORA = ParamGroup(
    init=_init_group, unet_call=adapted_call, merge=merge,
    from_checkpoint=lambda tree, stage: from_checkpoint(tree, stage["lora_rank"],
                                                        stage["lora_alpha"]),
)

METHOD = Method(
    name="lora",
    summary="rank-r adapters on the frozen U-Net's attention layers, S* frozen (LoRA)",
    defaults=DEFAULTS,
    source="arXiv 2106.09685; peft's default init; diffusers' train_dreambooth_lora.py "
           "(r 4, alpha = r, to_q/to_k/to_v/to_out.0)",
    trains={"lora": "learning_rate"},
    groups={"lora": LORA},
    terms=diffusion_only,
)

METHODS = (METHOD,)

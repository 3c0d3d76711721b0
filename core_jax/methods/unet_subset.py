"""A parameter group that is a chosen subset of the U-Net's weights (Custom Diffusion's
cross-attention K/V, AttnDreamBooth's whole cross-attention projections): each run holds only
those leaves, [C, ...], and a U-Net call uses the frozen params with them in place. The rest
of the tree is the frozen arrays themselves, so packed runs never copy it.

A subset is a tree mirroring the U-Net's params down to the chosen leaves
({..., "attn2": {"to_k": {"kernel": [in, out]}, ...}}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from core_jax.errors import InputError
from core_jax.methods.base import ParamGroup, Settings, UNetCall

Path = tuple[str, ...]


def attention_projection_paths(
    unet_params: Mapping[str, Any], projections: Sequence[str], attention: str = "attn2"
) -> list[Path]:
    """Module paths of the `projections` ("to_q", "to_k", "to_v", "to_out_0") of every
    `attention` layer ("attn2": cross-attention), in path order."""
    found = sorted(path[:-1] for path in traverse_util.flatten_dict(unet_params)
                   if path[-1] == "kernel" and len(path) >= 3 and path[-3] == attention
                   and path[-2] in projections)
    if not found:
        raise InputError(f"the U-Net has no {attention} layers with {', '.join(projections)}")
    return found


def subset(
    unet_params: Mapping[str, Any], modules: Sequence[Path], leaves: Sequence[str] = ("kernel",)
) -> dict[str, Any]:
    """The frozen values of `leaves` ("kernel", "bias") of each of `modules`, as a tree mirroring
    the U-Net's params; a leaf a module lacks (a projection without bias) is left out."""
    flat = traverse_util.flatten_dict(unet_params)
    return traverse_util.unflatten_dict(
        {m + (leaf,): flat[m + (leaf,)] for m in modules for leaf in leaves if m + (leaf,) in flat})


def merge(unet_params: Any, values: Mapping[str, Any]) -> Any:
    """The U-Net params with one run's subset in place of the frozen leaves; every other leaf
    is the frozen array itself (nothing copied)."""
    flat = traverse_util.flatten_dict(unet_params)
    for path, value in traverse_util.flatten_dict(values).items():
        if path not in flat:
            raise ValueError(f"{'.'.join(path)} is no weight of this U-Net")
        flat[path] = value.astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def merged_call(call: UNetCall, unet_params: Any, values: Mapping[str, Any]) -> Any:
    """`call` with one run's subset in place (a group's `unet_call`)."""
    return call(merge(unet_params, values))


def subset_group(
    choose: Callable[[Any], dict[str, Any]],
    unet_call: Callable[[UNetCall, Any, Any], Any] = merged_call,
) -> ParamGroup:
    """A group whose first value is `choose(frozen U-Net params)` (a subset, see `subset`) for
    every packed run, float32 [C, ...]; a U-Net call merges it (or runs `unet_call`)."""

    def init(settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int,
             keys: jax.Array) -> dict[str, Any]:
        num_runs = keys.shape[0]
        return jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_runs,) + x.shape).astype(jnp.float32),
            choose(frozen["unet"]))

    return ParamGroup(init=init, unet_call=unet_call, merge=merge)

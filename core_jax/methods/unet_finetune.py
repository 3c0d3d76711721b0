"""Fine-tuning the whole U-Net on the caption with S* frozen: CoRe's stage 2.

Each run trains its own copy of the U-Net (packed runs carry one copy each): the group "unet",
which a U-Net call uses in place of the frozen weights. Other methods that train the whole
U-Net (DreamBooth) train this group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from core_jax.methods.base import Method, ParamGroup, Settings, UNetCall
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_only


def _init_unet(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> Any:
    """Each run its own copy of the frozen U-Net."""
    num_runs = keys.shape[0]
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_runs,) + p.shape), frozen["unet"])


def _own_unet(call: UNetCall, unet_params: Any, own: Any) -> Any:
    return call(own)


UNET = ParamGroup(init=_init_unet, unet_call=_own_unet, merge=lambda unet_params, own: own,
                  split_over_data=True)

METHOD = Method(
    name="unet_finetune",
    summary="fine-tune the whole U-Net on 'a photo of a S*' with S* frozen (CoRe's stage 2)",
    defaults=DEFAULTS,
    source="arXiv 2408.15914 (stage 2: 1000 steps, batch 4, AdamW lr 2e-6)",
    trains={"unet": "learning_rate"},
    groups={"unet": UNET},
    terms=diffusion_only,
)

METHODS = (METHOD,)

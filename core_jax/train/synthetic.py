"""A complete stage-1 setup with random weights and latents: for tests and benchmarks.

Real runs build the same pieces from a model folder and photos (`core_jax.train.loop`); this
builds them from a named preset shape, so nothing is downloaded and every size is controlled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from core_jax.diffusion import NoiseSchedule, make_schedule
from core_jax.models.presets import get_preset, random_models
from core_jax.models.unet import UNetConfig
from core_jax.text import (
    add_placeholder_tokens,
    caption_ids,
    load_templates,
    load_tokenizer,
    placeholder_string,
)
from core_jax.train.concepts import ConceptSpec, build_concept_data
from core_jax.train.state import ConceptData, ConceptHypers, EmbeddingState, init_embedding_state
from core_jax.train.step import Stage1Config, make_optimizer

CORE_WEIGHTS = dict(
    learning_rate=5e-3, lambda_emb=1.5e-4, lambda_attn=0.05, lambda_pairwise=0.0,
    lambda_hinge=0.0, hinge_margin=0.5,
)
_SUPER_CATEGORIES = ("cat", "dog", "teddy bear", "cup", "backpack", "vase", "person", "car")


@dataclasses.dataclass
class Stage1Setup:
    text_encoder: nn.Module
    unet: nn.Module
    frozen: dict[str, Any]
    data: ConceptData
    hypers: ConceptHypers
    state: EmbeddingState
    config: Stage1Config
    optimizer: optax.GradientTransformation
    schedule: NoiseSchedule

    def step_kwargs(self) -> dict[str, Any]:
        return dict(
            text_encoder=self.text_encoder, unet=self.unet, optimizer=self.optimizer,
            config=self.config,
        )

    def args(self) -> tuple:
        return (self.state, self.data, self.hypers, self.frozen, self.schedule)


def random_stage1_setup(
    preset: str = "tiny",
    num_concepts: int = 1,
    batch_size: int = 2,
    num_vectors: int = 1,
    num_templates: int = 8,
    pool_size: int = 4,
    seed: int = 0,
    unet_overrides: dict[str, Any] | None = None,
    weights: dict[str, float] | None = None,
    dtype: str = "float32",
    **config: Any,
) -> Stage1Setup:
    """C concepts (super-categories cycling through a fixed list, alternating animate and
    inanimate templates) on random-weight models of `preset`; `config` sets Stage1Config fields."""
    shapes = get_preset(preset)
    shapes = dataclasses.replace(
        shapes, unet=UNetConfig(**{**dataclasses.asdict(shapes.unet), **(unet_overrides or {})})
    )
    models = random_models(shapes, seed, jnp.dtype(dtype))
    size = shapes.unet.sample_size

    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", num_vectors)
    text = placeholder_string("<s*>", num_vectors)
    specs = [
        ConceptSpec(
            f"concept{c}", _SUPER_CATEGORIES[c % len(_SUPER_CATEGORIES)],
            tuple(load_templates("animate" if c % 2 == 0 else "inanimate")[:num_templates]),
            seed=seed + c,
        )
        for c in range(num_concepts)
    ]
    rng = np.random.default_rng(seed)
    pools = [
        (rng.standard_normal((pool_size, size, size, 4)).astype(np.float32),
         np.full((pool_size, size, size, 4), 0.05, np.float32))
        for _ in specs
    ]
    data = build_concept_data(
        tokenizer, models.text_encoder, models.params["text"], text, specs, pools
    )
    optimizer = make_optimizer()
    init = jnp.repeat(data.super_embed[:, None], num_vectors, axis=1)
    return Stage1Setup(
        text_encoder=models.text_encoder,
        unet=models.unet,
        frozen={"text": models.params["text"], "unet": models.params["unet"]},
        data=data,
        hypers=ConceptHypers.broadcast(num_concepts, **{**CORE_WEIGHTS, **(weights or {})}),
        state=init_embedding_state(init, [s.seed for s in specs], optimizer),
        config=Stage1Config(
            batch_size=batch_size, caption_ids=tuple(int(i) for i in caption_ids(tokenizer, text)),
            placeholder_ids=tuple(placeholder_ids), **config,
        ),
        optimizer=optimizer,
        schedule=make_schedule(),
    )

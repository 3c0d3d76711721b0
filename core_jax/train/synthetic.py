"""A complete stage-1 setup with random weights and latents: for tests and benchmarks.

Real runs build the same pieces from a model folder and photos (`core_jax.train.loop`); this
builds them from a named preset shape, so nothing is downloaded and every size is controlled.
The program comes from the same `build_program` the loop uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from core_jax.config import STAGE1_METHODS, stage_config
from core_jax.diffusion import NoiseSchedule, make_schedule
from core_jax.methods import palp
from core_jax.models.presets import get_preset, random_models
from core_jax.models.unet import UNetConfig
from core_jax.text import (
    CLASS_FIELD,
    add_placeholder_tokens,
    caption_ids,
    fill_prompt,
    load_templates,
    load_tokenizer,
    placeholder_string,
)
from core_jax.train.concepts import (
    ConceptSpec,
    LatentPool,
    build_concept_data,
    knowledge_prompts,
)
from core_jax.train.passes import StepModels, with_shared
from core_jax.train.stages import build_program, stage_numbers, stage_params
from core_jax.train.state import ConceptData, TrainState, stage_keys
from core_jax.train.step import Numbers, StageProgram, init_state

_SUPER_CATEGORIES = ("cat", "dog", "teddy bear", "cup", "backpack", "vase", "person", "car")


@dataclasses.dataclass
class Setup:
    text_encoder: nn.Module
    unet: nn.Module
    frozen: dict[str, Any]
    data: ConceptData
    numbers: Numbers
    state: TrainState
    program: StageProgram
    schedule: NoiseSchedule

    def args(self) -> tuple:
        return (self.state, self.data, self.numbers, self.frozen, self.schedule)


def random_setup(
    preset: str = "tiny",
    num_concepts: int = 1,
    num_vectors: int = 1,
    num_templates: int = 8,
    pool_size: int = 4,
    seed: int = 0,
    unet_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    methods: Sequence[str] = STAGE1_METHODS,
    per_run: Sequence[dict[str, Any]] | None = None,
    class_pool_size: int = 0,
    attention: str = "auto",
    remat: str = "none",
    caption: str = "a photo of a {}",
    abstract_unet: bool = False,
    **stage: Any,
) -> Setup:
    """C concepts (super-categories cycling through a fixed list, alternating animate and
    inanimate templates) on random-weight models of `preset`. `stage` sets keys of the stage's
    config (`stage_config(methods, **stage)`: batch_size, weights, variants, ...); `per_run[c]`
    overrides keys for concept c (its numbers, say). `class_pool_size` > 0 gives each concept a
    random pool of that many class latents and the prompt "a photo of a <super-category>", as
    prior preservation reads them. `attention` and `remat`: the U-Net's (`config.model`).
    `caption`: the training caption; with "{cls}" each concept has its own (its class word).
    `abstract_unet`: the U-Net's parameters as shapes only, for a step that is compiled and
    never run (`random_models`; stage-1 methods only: nothing copies the U-Net)."""
    shapes = get_preset(preset)
    shapes = dataclasses.replace(
        shapes, unet=UNetConfig(**{**dataclasses.asdict(shapes.unet), **(unet_overrides or {})})
    )
    models = random_models(shapes, seed, jnp.dtype(dtype), abstract_unet)
    models.unet = models.unet.clone(attention=attention, remat=remat)
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
    side = size * 2 ** (len(shapes.vae.block_out_channels) - 1)
    uncropped = np.tile(np.asarray([side, side, 0, 0, side, side], np.int32), (pool_size, 1))
    pools = [
        LatentPool(rng.standard_normal((pool_size, size, size, 4)).astype(np.float32),
                   np.full((pool_size, size, size, 4), 0.05, np.float32), time_ids=uncropped)
        for _ in specs
    ]
    sdxl = {}  # SDXL presets: the second encoder, "!" padding (id 0); views uncropped squares
    if models.text_encoder_2 is not None:
        sdxl = dict(text_encoder_2=models.text_encoder_2, pad_id_2=0)
    prior: dict[str, Any] = {}
    if class_pool_size:
        prior["class_pools"] = [
            (rng.standard_normal((class_pool_size, size, size, 4)).astype(np.float32),
             np.full((class_pool_size, size, size, 4), 0.05, np.float32))
            for _ in specs
        ]
        prior["class_prompts"] = [f"a photo of a {s.super_category}" for s in specs]
    if CLASS_FIELD in caption:
        prior["captions"] = [fill_prompt(caption, text, s.super_category) for s in specs]
    stages = []
    for c in range(num_concepts):  # CoRe's stage-1 learning rate unless given
        values = {"learning_rate": 5e-3, **stage, **((per_run or [{}] * num_concepts)[c])}
        stages.append(stage_config(methods, **values))
    step_models = StepModels(
        models.text_encoder, models.unet,
        tuple(int(i) for i in caption_ids(tokenizer, text, caption, super_category="cat")),
        tuple(placeholder_ids), **(dict(sdxl, eos_id=tokenizer.eos_token_id) if sdxl else {}),
    )
    schedule = make_schedule()
    program = build_program(stages, step_models, schedule.prediction_type)
    data = build_concept_data(
        tokenizer, models.text_encoder, models.params["text"], text, specs, pools,
        **sdxl, **({"text_2_params": models.params["text_2"]} if sdxl else {}), **prior,
        with_phrases="phrase_hidden" in program.needs,
        knowledge=([knowledge_prompts(s.super_category, s.templates) for s in specs]
                   if "kp_hidden" in program.needs else None),
        target_prompts=([palp.target_prompt(st.palp_prompt, s.super_category)
                         for st, s in zip(stages, specs, strict=True)]
                        if program.needs & palp.PASSES else None),
    )
    frozen = with_shared({k: v for k, v in models.params.items() if k != "vae"},
                         program.trains)
    keys = stage_keys([s.seed for s in specs], 0)
    params = stage_params([program], 0, {}, data, frozen, num_vectors, keys)
    return Setup(
        text_encoder=models.text_encoder,
        unet=models.unet,
        frozen=frozen,
        data=data,
        numbers=stage_numbers(stages),
        state=init_state(program, params, keys),
        program=program,
        schedule=schedule,
    )

"""CoRe's test-time optimization (arXiv 2408.15914): before a prompt is sampled, S*'s vectors
take a few steps on CoRe's context regularizers with that prompt as the only regularization
prompt and no diffusion loss; its images are drawn with the adapted vectors.

From the paper (shared/DESIGN.md): 10 steps, learning rate 5e-4, regularizers only, the user's
prompt. What the paper leaves open, and what we chose:
- L_attn reads the U-Net on noisy latents; these are the run's own augmented photos, noised as
  in training (what S* was learned on), with the U-Net that samples (stage 2's when the run has
  one);
- the weights and variants of L_emb / L_attn are the run's stage-1 values (CoRe's defaults for a
  run that had none); the norm hold is off; AdamW as in stage 1, with fresh moments.

It is the training step itself (`core_jax.train.step`) with the methods ("test_time", "core"),
built once per run: a prompt is data (its ids padded to the encoder's length), so every prompt
runs in the program compiled for the first.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from core_jax.config import stage_config
from core_jax.errors import InputError
from core_jax.methods.core import DEFAULTS as CORE_DEFAULTS
from core_jax.text import add_placeholder_tokens, caption_ids, check_template, placeholder_string
from core_jax.train import setup as run_setup
from core_jax.train.concepts import ConceptSpec
from core_jax.train.parallel import fit_mesh
from core_jax.train.stages import build_program, check_stage, stage_numbers
from core_jax.train.state import stage_keys
from core_jax.train.step import init_state, shard_step

DEFAULT_STEPS = 10
DEFAULT_LEARNING_RATE = 5e-4
_CORE_KEYS = ("lambda_emb", "lambda_attn", "emb_variant", "attn_variant", "emb_encoders",
              "attn_layers")


def prompt_template(prompt: str, placeholder: str) -> str:
    """The user's prompt as a regularization template: S*, `{}` or the placeholder -> "{}"."""
    template = re.sub(r"(?<![<\w])S\*(?![\w>])", "{}", prompt).replace(placeholder, "{}")
    if template.count("{}") != 1:
        raise InputError(f"test-time optimization needs the prompt {prompt!r} to name the "
                         "learned word exactly once (write it as S*)")
    check_template(template)
    return template


def tto_stage(
    run_config: ml_collections.ConfigDict, steps: int, learning_rate: float
) -> ml_collections.ConfigDict:
    """The TTO stage's config: the run's stage-1 optimizer and CoRe settings, our steps and lr."""
    if steps < 1:
        raise InputError(f"test-time optimization steps is {steps}; give 1 or more")
    if not learning_rate > 0:
        raise InputError(f"test-time optimization learning rate is {learning_rate}; give > 0")
    first = run_config.stage1
    core = {k: first[k] if k in first else CORE_DEFAULTS[k] for k in _CORE_KEYS}
    stage = stage_config(
        ("test_time", "core"), steps=steps, learning_rate=learning_rate,
        batch_size=first.batch_size, weight_decay=first.weight_decay, b1=first.b1, b2=first.b2,
        clip_norm=first.clip_norm, rescale_end=0, **core,
    )
    check_stage("test-time optimization", stage)
    if not (stage.lambda_emb > 0 or stage.lambda_attn > 0):
        raise InputError("test-time optimization needs lambda_emb or lambda_attn > 0 in the "
                         "run's stage 1")
    return stage


@dataclasses.dataclass
class Adapted:
    """One prompt's adapted vectors and the regularizers before and after."""

    prompt: str
    vectors: np.ndarray  # [V, D]
    first: dict[str, float]  # the terms at the first step (the trained vectors)
    last: dict[str, float]  # the terms at the last step


class CoreTTO:
    """Adapts a trained run's vectors to one prompt at a time; one compiled step for all."""

    def __init__(
        self,
        run_config: ml_collections.ConfigDict,
        models: run_setup.Models,
        learned: np.ndarray,  # [V, D] the run's trained vectors
        unet_params: Any = None,  # the U-Net that samples; None: the frozen one
        *,
        steps: int = DEFAULT_STEPS,
        learning_rate: float = DEFAULT_LEARNING_RATE,
    ):
        self.config, self.models = run_config, models
        self.stage = tto_stage(run_config, steps, learning_rate)
        concept = run_config.concept
        self.tokenizer = copy.deepcopy(models.tokenizer)
        placeholder_ids = add_placeholder_tokens(self.tokenizer, concept.placeholder,
                                                 concept.num_vectors)
        self.text = placeholder_string(concept.placeholder, concept.num_vectors)
        step_models = run_setup.step_models(
            models, self.tokenizer, placeholder_ids,
            caption_ids(self.tokenizer, self.text, concept.caption),
        )
        self.program = build_program([self.stage], step_models,
                                     models.schedule.prediction_type)
        mesh, _ = fit_mesh(1, [self.stage.batch_size])
        self.step = shard_step(mesh, self.program)
        self.numbers = stage_numbers([self.stage])
        self._terms = ("loss", *(term.name for term in self.program.terms))
        self.frozen = {**models.frozen_text,
                       "unet": models.params["unet"] if unet_params is None else unet_params}
        self.learned = np.asarray(learned, np.float32)
        self.pool = run_setup.latent_pool(run_config, models,
                                          run_setup.concept_images(run_config))

    def adapt(self, prompt: str) -> Adapted:
        """`prompt` with the learned word as S*, `{}` or the placeholder."""
        concept = self.config.concept
        template = prompt_template(prompt, concept.placeholder)
        data = run_setup.concept_data(
            self.models, self.tokenizer, self.text,
            [ConceptSpec(concept.name, concept.super_category, (template,),
                         seed=self.config.seed)],
            [self.pool],
        )
        state = init_state(self.program, {"embeds": self.learned[None]},
                           stage_keys([self.config.seed], 0))
        history = []
        for _ in range(self.stage.steps):
            state, metrics = self.step(state, data, self.numbers, self.frozen,
                                       self.models.schedule)
            metrics = jax.device_get(metrics)
            history.append({k: float(np.asarray(metrics[k])[0]) for k in self._terms})
        return Adapted(prompt, np.asarray(jax.device_get(state.params["embeds"]))[0],
                       history[0], history[-1])

    def compilations(self) -> int:
        """How many programs the step has compiled (1 after any number of prompts)."""
        return self.step.jitted._cache_size()

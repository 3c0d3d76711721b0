"""Context drift (core_jax/toyworld/drift.py) on a random toy model: zero when the learned vector
is the super-category word's own embedding, positive for another vector, and the attention
shares are probabilities."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from core_jax.diffusion.schedule import schedule_from_config
from core_jax.text import add_placeholder_tokens, load_tokenizer
from core_jax.toyworld import drift
from core_jax.toyworld import model as toy_model
from core_jax.toyworld.world import Identity, concept_images

PROMPTS = ("a small {} on grass", "a {} on the left at night")


@pytest.fixture(scope="module")
def pipeline():
    """What DriftProbe reads of a `sample.Pipeline`, for the v1-shaped toy model with random
    weights (built here: no folder to write and load)."""
    text_encoder, unet, params = toy_model.init_models(seed=0)
    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", 1)
    return SimpleNamespace(
        tokenizer=tokenizer, placeholder="<s*>", placeholder_ids=tuple(placeholder_ids),
        text_encoder=text_encoder, text_params=params["text"], unet=unet,
        unet_params=params["unet"], schedule=schedule_from_config(toy_model.SCHEDULER_CONFIG),
    )


def _word_embedding(pipeline, word: str) -> jax.Array:
    (token,) = pipeline.tokenizer.encode(word, add_special_tokens=False)
    table = pipeline.text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    return table[token][None]  # [V=1, D]


def test_drift_is_zero_for_the_super_category_word_and_positive_otherwise(pipeline):
    photo = concept_images(Identity("star", "green", "dotted"), n=1)[0]
    probe = drift.DriftProbe(pipeline)
    same = probe(_word_embedding(pipeline, "star"), PROMPTS, "star", photo, timesteps=(500,))
    # y* and y_cat are the same token sequence then: no drift, the same attention share.
    assert same["emb"] == pytest.approx(0.0, abs=1e-5)
    assert same["attn"] == pytest.approx(0.0, abs=1e-9)
    assert same["token_share"] == pytest.approx(same["super_category_share"], abs=1e-5)
    assert 0.0 < same["token_share"] < 1.0
    other = probe(10.0 * _word_embedding(pipeline, "heart"), PROMPTS, "star", photo,
                  timesteps=(500,))
    assert other["emb"] > 1e-3 and other["attn"] > 0.0
    assert other["token_share"] != pytest.approx(other["super_category_share"], abs=1e-4)
    assert set(other["per_prompt"]) == set(PROMPTS)
    for row in other["per_prompt"].values():
        assert 0.0 <= row["token_share"] <= 1.0 and 0.0 <= row["super_category_share"] <= 1.0
    assert np.mean([r["emb"] for r in other["per_prompt"].values()]) == pytest.approx(
        other["emb"])

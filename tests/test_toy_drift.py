"""Context drift (core_jax/toyworld/drift.py) on a tiny random toy-world model: zero when the
learned vector is the super-category word's own embedding, positive for another vector, and the
attention shares are probabilities."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.diffusion.schedule import schedule_from_config
from core_jax.models.clip_text import CLIPTextModel
from core_jax.models.unet import UNet2DConditionModel
from core_jax.text import add_placeholder_tokens, load_tokenizer
from core_jax.toyworld import drift, model_v2
from core_jax.toyworld import model as toy_model
from core_jax.toyworld.world import Identity, concept_images

PROMPTS = ("a small {} on grass", "a {} on the left at night")


# A tiny toy-world pair with the v2 U-Net's 5 input channels (the probe appends the coordinate
# channels): full CLIP vocabulary, 1 text layer of 16, two U-Net levels.
TEXT = dataclasses.replace(toy_model.TEXT_CONFIG, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
UNET = dataclasses.replace(
    model_v2.UNET_CONFIG, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
    cross_attention_dim=16, attention_head_dim=2,
)


@pytest.fixture(scope="module")
def pipeline():
    """What DriftProbe reads of a `sample.Pipeline`, for a tiny random model built here."""
    text_encoder, unet = CLIPTextModel(TEXT), UNet2DConditionModel(UNET)
    k_text, k_unet = jax.random.split(jax.random.key(0))
    ids = jnp.zeros((1, TEXT.max_position_embeddings), jnp.int32)
    x = jnp.zeros((1, 32, 32, UNET.in_channels))
    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", 1)
    return SimpleNamespace(
        tokenizer=tokenizer, placeholder="<s*>", placeholder_ids=tuple(placeholder_ids),
        text_encoder=text_encoder, text_params=text_encoder.init(k_text, ids)["params"],
        unet=unet, unet_params=unet.init(k_unet, x, jnp.zeros((1,)),
                                         jnp.zeros((1, 1, TEXT.hidden_size)))["params"],
        schedule=schedule_from_config(toy_model.SCHEDULER_CONFIG),
    )


def _word_embedding(pipeline, word: str) -> jax.Array:
    (token,) = pipeline.tokenizer.encode(word, add_special_tokens=False)
    table = pipeline.text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    return table[token][None]  # [V=1, D]


@pytest.mark.slow  # 90 s here under load 8: mostly building the tiny model op by op (66 s)
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

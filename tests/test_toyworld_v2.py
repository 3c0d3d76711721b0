"""The toy world's v2 split (32 test and 16 validation identities held out of pretraining),
coordinate channels for pixel-space U-Nets, and the v2 pretraining's pieces that need no model:
compact vocabulary, learning-rate schedule, loss band, checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import weights
from core_jax.config import base_config
from core_jax.models.pixel import (
    PixelSpace,
    coordinate_channels,
    is_pixel_space_unet,
    with_coordinates,
)
from core_jax.sample import generate
from core_jax.text import load_tokenizer, tokenize
from core_jax.toyworld import CLASSIFIER_PATH, model_v2
from core_jax.toyworld import classifier as attribute_classifier
from core_jax.toyworld.world import (
    COLOURS,
    HELD_OUT_SHAPE,
    PATTERNS,
    SHAPES,
    TEST_IDENTITIES,
    V2_HELD_OUT_IDENTITIES,
    VALIDATION_IDENTITIES,
    caption,
    parse_caption,
    random_captions,
)
from core_jax.train import setup as run_setup


def test_split_sizes_disjoint_and_balanced():
    test, validation = set(TEST_IDENTITIES), set(VALIDATION_IDENTITIES)
    assert len(test) == len(TEST_IDENTITIES) == 32
    assert len(validation) == len(VALIDATION_IDENTITIES) == 16
    assert not test & validation
    assert set(V2_HELD_OUT_IDENTITIES) == test | validation
    for identities, per_value in ((TEST_IDENTITIES, 4), (VALIDATION_IDENTITIES, 2)):
        assert HELD_OUT_SHAPE not in {i.shape for i in identities}
        shapes = Counter(i.shape for i in identities)
        colours = Counter(i.colour for i in identities)
        patterns = Counter(i.pattern for i in identities)
        assert set(shapes.values()) == set(colours.values()) == {per_value}
        assert len(colours) == len(COLOURS)
        assert set(patterns.values()) == {per_value * 2} and len(patterns) == len(PATTERNS)
    # At most one held-out pattern per shape-colour pair, so every pair is still pretrained.
    pairs = Counter((i.shape, i.colour) for i in V2_HELD_OUT_IDENTITIES)
    assert max(pairs.values()) == 1


def test_every_word_pair_is_pretrained_but_no_held_out_triple():
    shapes = [s for s in SHAPES if s != HELD_OUT_SHAPE]
    seen = {t for t in itertools.product(shapes, COLOURS, PATTERNS)} - {
        (i.shape, i.colour, i.pattern) for i in V2_HELD_OUT_IDENTITIES
    }
    assert len(seen) == len(shapes) * len(COLOURS) * len(PATTERNS) - 48
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert {(t[a], t[b]) for t in seen} == {
            (x[a], x[b]) for x in itertools.product(shapes, COLOURS, PATTERNS)
        }


def test_no_pretraining_caption_names_a_held_out_identity():
    rng = np.random.default_rng(0)
    scenes = model_v2.pretraining_scenes(rng, 3000)
    held_out = {(i.shape, i.colour, i.pattern) for i in V2_HELD_OUT_IDENTITIES}
    triples = {scenes.identity(i) for i in range(len(scenes))}
    assert not {(i.shape, i.colour, i.pattern) for i in triples} & held_out
    assert HELD_OUT_SHAPE not in {i.shape for i in triples}
    for text in random_captions(scenes, rng, keep_p=0.85):
        words = parse_caption(text)
        named = tuple(words.get(a) for a in ("shape", "colour", "pattern"))
        assert named not in held_out


def test_training_batch_shapes_and_weights():
    tokenizer = load_tokenizer()
    vocabulary = model_v2.world_vocabulary(tokenizer)
    config = model_v2.PretrainConfigV2(batch_size=8)
    images, weights, ids, captions = model_v2.training_batch(
        np.random.default_rng(1), tokenizer, vocabulary, config
    )
    assert images.shape == (8, 32, 32, 3) and weights.shape == (8, 32, 32, 1)
    assert ids.shape == (8, 77) and ids.max() < len(vocabulary)
    assert weights.min() == pytest.approx(1.0)
    assert weights.max() <= 1.0 + config.object_weight + config.edge_weight + 1e-6


def test_band_marks_the_outline():
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, 2:6, 2:6] = 1.0
    band = model_v2._band(mask)
    assert band[0, 0, 0] == 0 and band[0, 4, 4] == 0  # far outside, deep inside
    assert band[0, 2, 3] == 1 and band[0, 1, 3] == 1  # on the edge, one pixel out


def test_coordinate_channels():
    coords = np.asarray(coordinate_channels(2, 4, 8))
    assert coords.shape == (2, 4, 8, 2)
    np.testing.assert_allclose(coords[0, 0, :, 0], (np.arange(8) + 0.5) / 4 - 1)  # x, left -1
    np.testing.assert_allclose(coords[0, :, 0, 1], (np.arange(4) + 0.5) / 2 - 1)  # y, top -1
    x = jnp.ones((2, 4, 8, 3))
    assert with_coordinates(x, 3) is x
    out = with_coordinates(x, 5)
    assert out.shape == (2, 4, 8, 5)
    np.testing.assert_array_equal(np.asarray(out[..., :3]), 1.0)
    np.testing.assert_array_equal(np.asarray(out[..., 3:]), coords)
    with pytest.raises(ValueError, match="input channels"):
        with_coordinates(x, 4)
    assert is_pixel_space_unet(3, 3) and is_pixel_space_unet(5, 3)
    assert not is_pixel_space_unet(4, 4) and not is_pixel_space_unet(9, 4)
    assert model_v2.UNET_CONFIG.in_channels == 5 and model_v2.UNET_CONFIG.out_channels == 3


def test_compact_vocabulary_round_trip():
    tokenizer = load_tokenizer()
    vocabulary = model_v2.world_vocabulary(tokenizer)
    assert vocabulary[-1] == tokenizer.eos_token_id and np.all(np.diff(vocabulary) > 0)
    row = {"shape": "moon", "colour": "teal", "pattern": "checked", "size": "small",
           "position": "right", "background": "brick", "style": "framed"}
    ids = tokenize(tokenizer, [caption(row), ""])
    compact = model_v2.compact_ids(vocabulary, ids)
    np.testing.assert_array_equal(vocabulary[compact], ids)
    with pytest.raises(ValueError, match="vocabulary"):
        model_v2.compact_ids(vocabulary, tokenize(tokenizer, ["a zebra"]))
    config = model_v2.compact_text_config(vocabulary)
    assert config.vocab_size == len(vocabulary)
    assert vocabulary[config.eos_token_id] == tokenizer.eos_token_id
    table = np.arange(len(vocabulary) * 2, dtype=np.float32).reshape(-1, 2) + 1
    compact_params = {"text_model": {"embeddings": {"token_embedding": {"embedding": table}}}}
    full = model_v2.full_text_params(compact_params, vocabulary)
    full_table = full["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert full_table.shape == (49408, 2)
    np.testing.assert_array_equal(full_table[vocabulary], table)
    assert np.count_nonzero(full_table.any(axis=1)) == len(vocabulary)


def test_learning_rate_schedule():
    config = model_v2.PretrainConfigV2(steps=1000, decay_steps=200, warmup_steps=100,
                                       learning_rate=1.0)
    lr = model_v2.learning_rate_schedule(config)
    assert float(lr(0)) == pytest.approx(0.01)
    assert float(lr(99)) == pytest.approx(1.0)
    assert float(lr(500)) == pytest.approx(1.0)
    assert float(lr(900)) == pytest.approx(0.5)
    assert float(lr(1000)) == pytest.approx(0.0)


def test_checkpoint_round_trip_and_fallback(tmp_path):
    params = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    state = model_v2.TrainState(jnp.asarray(7, jnp.int32), params, params, {"m": jnp.zeros(3)})
    template = jax.tree.map(jnp.zeros_like, state)
    path = tmp_path / "checkpoint.msgpack"
    model_v2.save_checkpoint(path, state, {"step": 7})
    state2 = state.replace(step=jnp.asarray(8, jnp.int32))
    model_v2.save_checkpoint(path, state2, {"step": 8})
    assert int(model_v2.load_checkpoint(path, template).step) == 8
    path.write_bytes(b"torn")  # a torn newest file: the previous checkpoint is read
    restored = model_v2.load_checkpoint(path, template)
    assert int(restored.step) == 7
    np.testing.assert_array_equal(np.asarray(restored.params["a"]), [0.0, 1.0, 2.0])


ROOT = Path(__file__).resolve().parents[1]
TINY = model_v2.Architecture(
    text=dataclasses.replace(model_v2.TEXT_CONFIG, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, projection_dim=16),
    unet=dataclasses.replace(
        model_v2.UNET_CONFIG, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=2,
    ),
)


@pytest.mark.slow
def test_pretraining_stops_resumes_and_exports(tmp_path):
    """A tiny v2 run: stopped after its first step, resumed by the same call to the end, with
    evaluations logged and the EMA model exported as a loadable 5-in, 3-out folder."""
    config = model_v2.PretrainConfigV2(steps=4, decay_steps=2, warmup_steps=2, batch_size=4)
    classifier_params = attribute_classifier.load_params(CLASSIFIER_PATH)
    sets = model_v2.evaluation_sets(per_identity=1, seen=4)
    run = tmp_path / "run"
    common = dict(eval_every=2, architecture=TINY, eval_sets=sets, log=lambda _: None)
    state = model_v2.pretrain(run, config, classifier_params, stop_after_s=1e-9, **common)
    assert int(state.step) == 1
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 1
    state = model_v2.pretrain(run, config, classifier_params, **common)
    assert int(state.step) == 4
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [0, 2, 4]
    assert set(evals[-1]) >= {"test", "validation", "seen", "held_out"}
    assert 0.0 <= evals[-1]["held_out"]["colour"] <= 1.0
    folder = model_v2.export_checkpoint(run, tmp_path / "model", TINY)
    unet, _ = weights.load_unet(folder)
    assert (unet.config.in_channels, unet.config.out_channels) == (5, 3)
    text_encoder, text_params = weights.load_text_encoder(folder)
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert table.shape == (49408, 16)
    info = json.loads((folder / "toyworld.json").read_text())
    assert len(info["held_out"]["test_identities"]) == 32
    assert info["pretrain_v2"]["step"] == 4


@pytest.fixture(scope="module")
def tiny_v2_folder(tmp_path_factory):
    """A tiny v2-shaped model (5 channels in, 3 out, no vae/) exported as the pretraining does."""
    vocabulary = model_v2.world_vocabulary(load_tokenizer())
    _, _, params = model_v2.init_models(0, vocabulary, TINY)
    return model_v2.export(tmp_path_factory.mktemp("v2") / "model", params, vocabulary, {}, TINY)


def test_a_coordinate_unet_loads_as_pixel_space_and_appends_its_own_coordinates(tiny_v2_folder):
    """The train step and the sampler call every U-Net with out_channels-channel samples: a
    coordinate U-Net appends x and y itself (the same output as given them explicitly), and a
    folder of one without vae/ is a pixel-space model whose sampler draws 3-channel noise."""

    config = base_config()
    config.model.path = str(tiny_v2_folder)
    models = run_setup.load_models(config)
    assert isinstance(models.vae, PixelSpace)
    unet, params = models.unet, models.params["unet"]
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    context = jax.random.normal(jax.random.key(1), (2, 77, 16))
    appended = unet.apply({"params": params}, x, jnp.array([10, 900]), context)
    explicit = unet.apply({"params": params}, with_coordinates(x, 5), jnp.array([10, 900]),
                          context)
    np.testing.assert_array_equal(np.asarray(appended), np.asarray(explicit))
    with pytest.raises(ValueError, match="cannot take 4-channel samples"):
        unet.apply({"params": params}, jnp.zeros((1, 32, 32, 4)), 0, context[:1])

    pipeline = run_setup.sampling_pipeline(models, models.tokenizer, (), "<s*>")
    images = generate(pipeline, ["a red star on grass"], steps=2, seed=0)
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_core_jax_train_and_sample_run_on_a_coordinate_unet(tiny_v2_folder, tmp_path):
    """`core-jax train` (CoRe, both stages) and `core-jax sample` on a v2-shaped toy model."""
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": ""}
    train = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config", str(ROOT / "configs/default.py"),
         "--workdir", str(workdir), f"--config.model.path={tiny_v2_folder}",
         "--config.concept.images=toyworld:red striped star",
         "--config.concept.super_category=star", "--config.concept.caption=a {}",
         "--config.data.resolution=32", "--config.data.num_views=2",
         "--config.stage1.steps=2", "--config.stage1.batch_size=2",
         "--config.stage1.rescale_start=1", "--config.stage1.rescale_end=2",
         "--config.stage2.steps=1", "--config.stage2.batch_size=2",
         "--config.sample.at_end=False"],
        capture_output=True, text=True, env=env, timeout=1500)
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("stage") for r in records} >= {1, 2}
    sample = subprocess.run(
        [sys.executable, "-m", "core_jax", "sample", "--workdir", str(workdir), "--prompt",
         "a S* on grass", "--num_images", "1", "--steps", "2", "--out",
         str(tmp_path / "grass.png")], capture_output=True, text=True, env=env, timeout=900)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (tmp_path / "grass.png").is_file()

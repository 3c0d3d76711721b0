"""NeTI: the mapper against a numpy writing of the code's forward (positional encoding, anchors,
output norm, nested dropout, the bypass formula), gradients, jit/vmap; values apart in the
per-layer U-Net call; the encoder's bypassed encoding; a step trains the mapper and nothing
else, and S*'s vectors depend on the timestep; packed runs equal each alone; NeTI refuses what
it cannot share a stage with; the mapper's export round-trips and the sampler draws with it.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from core_jax.errors import InputError
from core_jax.methods import neti

NUM_LAYERS, WIDTH = 16, 32


def _mapper(seed: int = 0, norm: float = 2.5, bypass: bool = True, **kw):
    return neti.init_mapper(jax.random.key(seed), norm, num_layers=NUM_LAYERS, width=WIDTH,
                            bypass=bypass, **kw)


# --- numpy writing of the code's forward (models/neti_mapper.py, positional_encoding.py) -----

def _np_encoding(w: np.ndarray, t: float, layer: float) -> np.ndarray:
    x = np.array([t, layer], np.float64)
    v = np.concatenate([np.sin(w @ x), np.cos(w @ x)])
    return v / np.linalg.norm(v)


def _np_layer_norm(x, p):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_forward(value, t, layer, truncation=None):
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), value)
    h = _np_encoding(v["constants"]["frequencies"], t, layer) @ v["input"]["kernel"] + \
        v["input"]["bias"]
    for k in range(2):
        h = h @ v[f"hidden_{k}"]["kernel"] + v[f"hidden_{k}"]["bias"]
        h = _np_layer_norm(h, v[f"norm_{k}"])
        h = np.where(h > 0, h, 0.01 * h)
    if truncation is not None:
        h[truncation:] = 0
    out = np.concatenate([h @ v["output"]["kernel"] + v["output"]["bias"],
                          h @ v["bypass"]["kernel"] + v["bypass"]["bias"]])
    out = out / np.linalg.norm(out) * v["constants"]["norm"]  # F.normalize, then the scale
    return out[:WIDTH], out[WIDTH:]


def test_positional_encoding_is_the_codes():
    value = _mapper()
    w = np.asarray(value["constants"]["frequencies"])
    assert w.shape == (neti.NUM_FREQUENCIES, 2)
    # The columns are N(0, 1) scaled by sigma_t 0.03 and sigma_l 2.0.
    np.testing.assert_allclose(w.std(axis=0), [0.03, 2.0], rtol=0.1)
    t, layer = jnp.asarray([0, 250, 999]), jnp.asarray([0, 7, 15])
    ours = np.asarray(neti.positional_encoding(value["constants"]["frequencies"], t, layer))
    assert ours.shape == (3, 2 * neti.NUM_FREQUENCIES)
    for k in range(3):
        np.testing.assert_allclose(ours[k], _np_encoding(w.astype(np.float64), float(t[k]),
                                                         float(layer[k])), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)


def test_anchor_kernel_holds_the_anchors_time_major():
    value = _mapper()
    kernel = np.asarray(value["input"]["kernel"])
    assert kernel.shape == (2 * neti.NUM_FREQUENCIES, 10 * NUM_LAYERS)  # input dim 160
    w = np.asarray(value["constants"]["frequencies"], np.float64)
    for column, (t, layer) in {0: (0, 0), 1: (0, 1), 16: (100, 0), 159: (900, 15)}.items():
        np.testing.assert_allclose(kernel[:, column], _np_encoding(w, t, layer), atol=2e-5)
    # So the first layer reads the encoding's cosine to each anchor: 1 at an anchor.
    enc = neti.positional_encoding(value["constants"]["frequencies"], 300, 4)
    np.testing.assert_allclose(enc @ kernel[:, 3 * NUM_LAYERS + 4], 1.0, rtol=1e-5)


@pytest.mark.parametrize("truncation", [None, 0, 37])
def test_mapper_matches_a_numpy_writing_of_the_code(truncation):
    value = _mapper(seed=1)
    t, layer = 417, 9
    keep = None if truncation is None else jnp.asarray(truncation)
    token, bypass = neti.mapper_outputs(value, jnp.asarray(t), jnp.asarray(layer), keep)
    want_token, want_bypass = _np_forward(value, t, layer, truncation)
    np.testing.assert_allclose(np.asarray(token), want_token, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(bypass), want_bypass, rtol=2e-4, atol=2e-5)


def test_output_norm_is_the_super_category_norm():
    with_bypass = _mapper(norm=3.7)
    t, layers = jnp.arange(0, 1000, 37)[:, None], jnp.arange(NUM_LAYERS)[None, :]
    token, bypass = neti.mapper_outputs(with_bypass, t, layers)
    joint = jnp.sqrt(jnp.sum(token**2, -1) + jnp.sum(bypass**2, -1))
    np.testing.assert_allclose(np.asarray(joint), 3.7, rtol=1e-5)  # the code's joint norm
    assert np.all(np.asarray(jnp.linalg.norm(token, axis=-1)) < 3.7)
    alone, none = neti.mapper_outputs(_mapper(norm=3.7, bypass=False), t, layers)
    assert none is None
    np.testing.assert_allclose(np.asarray(jnp.linalg.norm(alone, axis=-1)), 3.7, rtol=1e-5)


def test_nested_dropout_truncates_the_hidden_units():
    keys = jax.random.split(jax.random.key(0), 4000)
    keep = jax.vmap(lambda k: neti.nested_dropout_keep(k, jnp.float32(0.5), 128))(keys)
    keep = np.asarray(keep)
    assert keep.min() >= 0 and keep.max() == 128
    assert abs((keep == 128).mean() - 0.5) < 0.03  # untouched with probability 1 - p
    truncated = keep[keep < 128]
    assert abs(truncated.mean() - 63.5) < 3 and truncated.min() == 0  # uniform in [0, 128)
    never = jax.vmap(lambda k: neti.nested_dropout_keep(k, jnp.float32(0.0), 128))(keys)
    assert np.all(np.asarray(never) == 128)
    # Truncating at k equals zeroing units k.. of the hidden representation.
    value = _mapper(seed=2)
    h = neti.mapper_hidden(value, jnp.asarray(10), jnp.asarray(3))
    cut = h.at[20:].set(0.0)
    token, _ = neti.mapper_outputs(value, jnp.asarray(10), jnp.asarray(3), jnp.asarray(20))
    raw = cut @ value["output"]["kernel"] + value["output"]["bias"]
    bypass = cut @ value["bypass"]["kernel"] + value["bypass"]["bias"]
    want = raw / jnp.sqrt(jnp.sum(raw**2) + jnp.sum(bypass**2)) * value["constants"]["norm"]
    np.testing.assert_allclose(np.asarray(token), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bypass_formula_by_hand():
    states = jnp.asarray([[3.0, 4.0, 0.0]])  # norm 5
    bypass = jnp.asarray([[0.0, 0.0, 2.0]])  # direction e3
    np.testing.assert_allclose(np.asarray(neti.apply_bypass(states, bypass)),
                               [[3.0, 4.0, 0.2 * 5.0]], rtol=1e-6)
    # Zero states stay zero; the bypass's own norm does not matter.
    np.testing.assert_allclose(np.asarray(neti.apply_bypass(jnp.zeros((1, 3)), bypass)), 0.0)
    np.testing.assert_allclose(np.asarray(neti.apply_bypass(states, 7 * bypass)),
                               np.asarray(neti.apply_bypass(states, bypass)), rtol=1e-6)


def test_timestep_vectors_shapes_dropout_and_timestep_dependence():
    value = _mapper(seed=3)
    t = jnp.asarray([5, 5, 900])
    vectors, bypass = neti.timestep_vectors(value, t, None)
    chex.assert_shape((vectors, bypass), (3, NUM_LAYERS, 1, WIDTH))
    np.testing.assert_array_equal(np.asarray(vectors[0]), np.asarray(vectors[1]))
    assert np.abs(np.asarray(vectors[0] - vectors[2])).max() > 1e-3  # timestep matters
    assert np.abs(np.asarray(vectors[0, 0] - vectors[0, 1])).max() > 1e-3  # so does the layer
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 3))
    dropped, _ = neti.timestep_vectors(value, t, keys)
    changed = np.abs(np.asarray(dropped - vectors)).max(axis=(2, 3))  # [b, L]
    assert 0 < (changed > 0).mean() < 1  # some (row, layer) pairs truncated, not all
    again, _ = neti.timestep_vectors(value, t, keys)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(dropped))


def test_inference_truncation_keeps_the_first_k_hidden_units():
    """The code's `truncation_idx` at sampling: k = H equals no truncation; at k the vectors are
    the numpy mapper's with hidden units k.. zeroed, at every layer."""
    value = _mapper(seed=5)
    t = jnp.asarray([417, 60])
    hidden = value["hidden_1"]["bias"].shape[-1]
    plain = neti.timestep_vectors(value, t, None)
    full = neti.timestep_vectors(value, t, None, truncation=jnp.int32(hidden))
    chex.assert_trees_all_equal(full, plain)
    k = 37
    vectors, bypass = jax.jit(neti.timestep_vectors)(value, t, None, jnp.int32(k))
    layers = np.asarray(value["constants"]["layers"])
    for r in range(2):
        for layer in range(NUM_LAYERS):
            want_token, want_bypass = _np_forward(value, int(t[r]), float(layers[layer]), k)
            np.testing.assert_allclose(np.asarray(vectors[r, layer, 0]), want_token, rtol=2e-4,
                                       atol=2e-5)
            np.testing.assert_allclose(np.asarray(bypass[r, layer, 0]), want_bypass, rtol=2e-4,
                                       atol=2e-5)
    assert np.abs(np.asarray(vectors - plain[0])).max() > 1e-3
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 2))
    with pytest.raises(ValueError, match="truncation is for sampling"):
        neti.timestep_vectors(value, t, keys, truncation=jnp.int32(k))


def test_mapper_gradients_jit_and_vmap():
    value = _mapper(seed=4, hidden=16, num_time_anchors=2, num_frequencies=8)
    trained = {k: v for k, v in value.items() if k != "constants"}

    def f(trained):
        token, bypass = neti.mapper_outputs({**trained, "constants": value["constants"]},
                                            jnp.asarray([3.0, 700.0]), jnp.asarray([1.0, 14.0]))
        return jnp.sum(jnp.sin(token)) + jnp.sum(bypass**2)

    check_grads(f, (trained,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    # The constants receive no gradient.
    grads = jax.grad(lambda v: jnp.sum(neti.timestep_vectors(v, jnp.asarray([9]), None)[0]))(
        value)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["constants"]))
    t = jnp.asarray([1, 500])
    plain = neti.timestep_vectors(value, t, None)
    chex.assert_trees_all_close(jax.jit(neti.timestep_vectors)(value, t, None), plain,
                                rtol=1e-5, atol=1e-6)
    packed = jax.tree.map(lambda a, b: jnp.stack([a, b]), value, _mapper(
        seed=5, hidden=16, num_time_anchors=2, num_frequencies=8))
    both = jax.vmap(lambda v: neti.timestep_vectors(v, t, None))(packed)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], both), plain, rtol=1e-5,
                                atol=1e-6)


def test_neti_refuses_core_xti_and_sdxl_in_one_line():
    from core_jax.config import stage_config
    from core_jax.methods import Settings, get_method

    stage = stage_config(("neti", "core"), learning_rate=8e-3).to_dict()
    with pytest.raises(InputError, match="neti cannot share a stage with core"):
        get_method("neti").terms(Settings(stage))
    for other in ("xti", "textboost", "textual_inversion"):
        stage = stage_config(("neti", other), learning_rate=8e-3).to_dict()
        with pytest.raises(InputError, match=f"with {other}"):
            get_method("neti").terms(Settings(stage))
    alone = stage_config(("neti",), learning_rate=8e-3).to_dict()
    with pytest.raises(InputError, match="one text encoder"):
        get_method("neti").terms(Settings(alone, encoder_widths=(768, 1280)))
    assert [t.name for t in get_method("neti").terms(Settings(alone))] == ["diffusion"]


# --- Values apart in the per-layer U-Net call, the bypassed encoding ---------------------------

@pytest.mark.slow
def test_values_apart_give_each_to_v_its_own_context():
    """With 2 L contexts, layer k's keys read context k and its values context L + k; equal
    keys' and values' contexts give the plain per-layer call."""
    from flax import linen as nn

    from core_jax.layer_contexts import cross_attention_layers, join_layers, per_layer_contexts
    from core_jax.models.presets import random_models

    models = random_models("micro", 0)
    unet, params = models.unet, models.params["unet"]
    layers = cross_attention_layers(unet)
    rng = np.random.default_rng(0)
    size = unet.config.sample_size
    x = jnp.asarray(rng.standard_normal((2, size, size, unet.config.in_channels)), jnp.float32)
    t = jnp.asarray([10, 900])
    keys = jnp.asarray(rng.standard_normal((len(layers), 2, 5, unet.config.cross_attention_dim)),
                       jnp.float32)
    values = keys + jnp.asarray(rng.standard_normal(keys.shape), jnp.float32)

    def call(contexts, apart, inner=None):
        with per_layer_contexts(layers, values_apart=apart), inner or contextlib.nullcontext():
            return unet.apply({"params": params}, x, t, join_layers(contexts))

    same = call(jnp.concatenate([keys, keys]), True)
    np.testing.assert_allclose(np.asarray(same), np.asarray(call(keys, False)), atol=1e-6)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name in ("to_k", "to_v"):
            path = "/".join(context.module.path[:-2])
            if path in layers:
                seen[(path, context.module.name)] = args[0]
        return next_fun(*args, **kwargs)

    # Recorded inside (after) per_layer_contexts: what to_k and to_v are given.
    apart = call(jnp.concatenate([keys, values]), True, nn.intercept_methods(record))
    for k, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(seen[(layer, "to_k")]), np.asarray(keys[k]))
        np.testing.assert_array_equal(np.asarray(seen[(layer, "to_v")]), np.asarray(values[k]))
    assert np.abs(np.asarray(apart - same)).max() > 1e-4


@pytest.mark.slow
def test_bypassed_encoding_shifts_s_star_before_the_final_layer_norm():
    from flax import linen as nn

    from core_jax.models.presets import random_models
    from core_jax.text import (
        encode_per_layer,
        encode_per_layer_with_bypass,
        placeholder_slots,
    )

    models = random_models("tiny", 0)
    text, text_params = models.text_encoder, models.params["text"]
    width = text.config.hidden_size
    placeholder = text.config.vocab_size
    ids = jnp.asarray([[49406, 320, placeholder, 49407] + [49407] * 73] * 2)
    slots = placeholder_slots(ids, [placeholder])
    rng = np.random.default_rng(1)
    learned = jnp.asarray(rng.standard_normal((2, 3, 1, width)), jnp.float32)  # [R, L, V, D]
    bypass = jnp.asarray(rng.standard_normal((2, 3, 1, width)), jnp.float32)
    hidden, bypassed = encode_per_layer_with_bypass(text, text_params, ids, learned, slots,
                                                    bypass, neti.apply_bypass)
    chex.assert_shape((hidden, bypassed), (2, 3, 77, width))
    for r in range(2):  # the keys' encoding is the ordinary per-layer one
        want = encode_per_layer(text, text_params, ids[r:r + 1], learned[r], (
            slots[0][r:r + 1], slots[1][r:r + 1]))[:, 0]
        np.testing.assert_allclose(np.asarray(hidden[r]), np.asarray(want), atol=1e-5)
    # By hand: the pre-norm state at S* (position 2) shifted, then the final layer norm; the
    # other positions unchanged.
    out = text.apply({"params": text_params}, ids[:1], inject_embeds=jnp.broadcast_to(
        learned[0, 1], (1, 77, width)), inject_mask=slots[0][:1], output_hidden_states=True)
    pre = out.hidden_states[-1][0, 2]
    shifted = pre + 0.2 * bypass[0, 1, 0] / jnp.linalg.norm(bypass[0, 1, 0]) * jnp.linalg.norm(pre)
    final = nn.LayerNorm(epsilon=text.config.layer_norm_eps).apply(
        {"params": text_params["text_model"]["final_layer_norm"]}, shifted)
    np.testing.assert_allclose(np.asarray(bypassed[0, 1, 2]), np.asarray(final), atol=1e-5)
    np.testing.assert_allclose(np.asarray(bypassed[:, :, 3:]), np.asarray(hidden[:, :, 3:]),
                               atol=1e-6)
    assert np.abs(np.asarray(bypassed[:, :, 2] - hidden[:, :, 2])).max() > 1e-3


# --- The step ----------------------------------------------------------------------------------

def _setup(num_concepts: int = 1, per_run=None):
    from core_jax.train.synthetic import random_setup

    return random_setup(preset="tiny", unet_overrides={"layers_per_block": 1},
                        num_concepts=num_concepts, batch_size=2, methods=("neti",),
                        weight_decay=1e-2, per_run=per_run)


@pytest.mark.slow
def test_a_step_trains_the_mapper_and_nothing_else():
    import packing

    setup = _setup()
    params = setup.state.params
    assert set(params) == {"embeds", "neti"} and set(setup.program.trains) == {"neti"}
    first = jax.device_get(params)
    norm = np.linalg.norm(np.asarray(setup.data.super_embed), axis=-1)
    np.testing.assert_allclose(first["neti"]["constants"]["norm"], norm, rtol=1e-6)
    frozen_before = jax.device_get(setup.frozen)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    assert set(history[0]) >= {"diffusion", "loss"} and np.isfinite(history[-1]["diffusion"]).all()
    after = state.params
    trained = {k: v for k, v in after["neti"].items() if k != "constants"}
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), trained,
                         {k: first["neti"][k] for k in trained})
    assert all(m > 0 for m in jax.tree.leaves(moved)), moved  # every layer of the mapper
    # The constants held (weight decay would shrink them), "embeds" untouched, frozen models too.
    jax.tree.map(np.testing.assert_array_equal, after["neti"]["constants"],
                 first["neti"]["constants"])
    np.testing.assert_array_equal(after["embeds"], first["embeds"])
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(setup.frozen))
    # S*'s vectors depend on the timestep (and the layer).
    one = jax.tree.map(lambda a: jnp.asarray(a[0]), after["neti"])
    vectors, bypass = neti.timestep_vectors(one, jnp.asarray([0, 999]), None)
    assert np.abs(np.asarray(vectors[0] - vectors[1])).max() > 1e-3
    assert bypass is not None


@pytest.mark.slow
def test_packed_neti_runs_equal_each_alone():
    """Two runs at learning rates 3x apart packed, and each alone: losses to 1e-5 relative,
    gradient norms to 1e-3 (the mapper's gradient sums b x 16 rows' outer products through two
    LayerNorms: reassociated sums over a batch of 4 or 2 rows move it by ~1e-4, measured), the
    mapper to 2e-4 relative L2; a mix-up of the runs (their dropout draws, their learning
    rates) would move the loss or the mapper by whole updates."""
    import packing

    per_run = [{"learning_rate": 8e-3}, {"learning_rate": 2.4e-2}]
    packed = _setup(2, per_run)
    step_fn = packing.one_device_step(packed)
    together, history_together = packing.run_steps(packed, step_fn, 2)
    assert step_fn.jitted._cache_size() == 1
    flat = lambda tree, c: np.concatenate([np.ravel(a[c]) for a in jax.tree.leaves(tree)])  # noqa: E731
    for c in range(2):
        alone = packing.alone(_setup(2, per_run), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 2)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name, rtol in (("loss", 1e-5), ("grad_norm", 1e-3)):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=rtol)
        want = flat(together.params["neti"], c)
        error = np.linalg.norm(flat(state.params["neti"], 0) - want) / np.linalg.norm(want)
        assert error < 2e-4, error


# --- Export and sampling -----------------------------------------------------------------------

def test_mapper_export_round_trips_and_the_sampler_draws_with_it(tmp_path):
    """The file holds the mapper and its rebuild config; loaded, it draws what the in-memory
    mapper draws; the mapper is evaluated at each step (a mapper whose vectors differ only at
    late timesteps draws something else); a file for other layers is refused."""
    import json

    from safetensors import safe_open

    from core_jax import export
    from core_jax.layer_contexts import TimestepVectors, cross_attention_layers
    from core_jax.sample import generate, random_pipeline

    pipeline = random_pipeline("micro")
    layers = list(cross_attention_layers(pipeline.unet))
    norm = 0.4  # a token embedding's norm in the random pipeline's range
    mapper = neti.init_mapper(jax.random.key(7), norm, num_layers=len(layers),
                              width=pipeline.embed_dim)
    path = export.save_neti_mapper(tmp_path, "<s*>", layers, mapper)
    assert path == tmp_path / export.NETI_NAME
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
        names = set(f.keys())  # noqa: SIM118
    assert {"hidden_0.kernel", "constants.frequencies", "bypass.kernel"} <= names
    config = json.loads(metadata["config"])
    assert config == {**config, "num_layers": len(layers), "num_time_anchors": 10,
                      "hidden": 128, "width": pipeline.embed_dim, "bypass": True,
                      "bypass_scale": 0.2}
    assert json.loads(metadata["layers"])[0] == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    placeholder, loaded = export.load_neti_mapper(tmp_path, layers)
    assert placeholder == "<s*>"
    chex.assert_trees_all_equal(loaded, jax.device_get(mapper))
    with pytest.raises(InputError, match="not this U-Net's"):
        export.load_neti_mapper(path, layers[:-1])

    kwargs = dict(steps=2, guidance_scale=3.0, seed=0)
    prompts = ["a photo of a <s*>"]
    in_memory = generate(pipeline, prompts, TimestepVectors(
        mapper, neti.timestep_vectors, neti.apply_bypass), **kwargs)
    from_file = generate(pipeline, prompts, export.neti_vectors(loaded), **kwargs)
    np.testing.assert_array_equal(from_file, in_memory)
    # The sampler reads the mapper: another mapper draws another image.
    other = neti.init_mapper(jax.random.key(8), norm, num_layers=len(layers),
                             width=pipeline.embed_dim)
    assert np.any(generate(pipeline, prompts, export.neti_vectors(other), **kwargs) != in_memory)
    # `core-jax sample --neti_truncation K`: all 128 hidden units draw the same image; 4 of
    # them another; more than the mapper has is refused.
    np.testing.assert_array_equal(
        generate(pipeline, prompts, export.neti_vectors(loaded, 128), **kwargs), in_memory)
    assert np.any(generate(pipeline, prompts, export.neti_vectors(loaded, 4), **kwargs)
                  != in_memory)
    with pytest.raises(InputError, match="NeTI truncation is 129"):
        export.neti_vectors(loaded, 129)


# --- End to end --------------------------------------------------------------------------------

MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=3", "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {}',)", "--config.log_every=1",
    "--config.checkpoint_every=3",
]


@pytest.mark.slow
def test_core_jax_train_with_neti_tiny_exports_the_mapper(tmp_path):
    """`core-jax train --config configs/neti_tiny.py` shrunk to the micro preset and 3 steps:
    neti_mapper.safetensors holds the checkpoint's mapper, moved from its start;
    `core-jax export` writes the same file and `core-jax sample` draws with it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import orbax.checkpoint as ocp

    from core_jax import export
    from core_jax.layer_contexts import cross_attention_layers
    from core_jax.models.presets import get_preset
    from core_jax.models.unet import UNet2DConditionModel
    from core_jax.train.outputs import export_run, sample_run

    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(root / "configs/neti_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"diffusion"' in (workdir / "metrics.jsonl").read_text()
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options) as m:
        state = m.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "neti"}
    layers = list(cross_attention_layers(UNet2DConditionModel(get_preset("micro").unet)))
    _, loaded = export.load_neti_mapper(workdir, layers)
    trained = jax.tree.map(lambda a: np.asarray(a)[0], state["params"]["neti"])
    chex.assert_trees_all_equal(loaded, trained)
    written = export_run(workdir, tmp_path / "export")
    assert tmp_path / "export" / export.NETI_NAME in written
    _, again = export.load_neti_mapper(tmp_path / "export", layers)
    chex.assert_trees_all_equal(again, loaded)
    grid = sample_run(workdir, ["a S* in the jungle"], num_images=1, steps=2, sampler=None,
                      guidance_scale=None, seed=0, out=tmp_path / "grid.png", say=lambda _: None)
    assert grid.is_file()
    # `core-jax sample --neti_truncation 8`: the mapper's first 8 hidden units, another image.
    truncated = sample_run(workdir, ["a S* in the jungle"], num_images=1, steps=2, sampler=None,
                           guidance_scale=None, seed=0, out=tmp_path / "truncated.png",
                           neti_truncation=8, say=lambda _: None)
    from PIL import Image

    assert np.any(np.asarray(Image.open(truncated)) != np.asarray(Image.open(grid)))

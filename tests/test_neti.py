"""NeTI: the mapper against a numpy writing of the code's forward (positional encoding, anchors,
output norm, nested dropout, the bypass formula), gradients, jit/vmap; values apart in the
per-layer U-Net call; the encoder's bypassed encoding; a step trains the mapper and nothing
else, and S*'s vectors depend on the timestep; packed runs equal each alone; NeTI refuses what
it cannot share a stage with; the mapper's export round-trips and the sampler draws with it.
"""

from __future__ import annotations

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

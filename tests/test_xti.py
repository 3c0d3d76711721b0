"""XTI / P+: with every layer's context equal the per-layer U-Net is the ordinary call, and with
different ones layer k's attn2 reads context k; a step trains the 16 layers' vectors and nothing
else; packed runs equal each alone; the export round-trips and the sampler draws the same with
the loaded vectors; XTI refuses CoRe in one line; `core-jax train` with configs/xti_tiny.py and a
sweep of XTI and CoRe runs (one program per group) end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import packing
import pytest
from flax import linen as nn
from numerics import assert_within_one_adam_step
from safetensors.numpy import load_file

from core_jax import export
from core_jax.errors import InputError
from core_jax.layer_contexts import cross_attention_layers, join_layers, per_layer_contexts
from core_jax.models.presets import random_models
from core_jax.text import encode_per_layer, encode_with_learned, placeholder_slots

ROOT = Path(__file__).resolve().parents[1]


def _unet_inputs(unet, batch: int = 2, tokens: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = unet.config.sample_size
    x = jnp.asarray(rng.standard_normal((batch, size, size, unet.config.in_channels)),
                    jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch))
    layers = cross_attention_layers(unet)
    contexts = jnp.asarray(rng.standard_normal(
        (len(layers), batch, tokens, unet.config.cross_attention_dim)), jnp.float32)
    return x, t, layers, contexts


def _per_layer_call(unet, params, x, t, layers, contexts):
    with per_layer_contexts(layers):
        return unet.apply({"params": params}, x, t, join_layers(contexts))


# --- The per-layer U-Net call ------------------------------------------------------------------

def test_equal_layer_contexts_give_the_ordinary_call():
    """All 16 layers given the same context: the output is the plain call's (both jitted)."""
    models = random_models("tiny", 0)
    unet, params = models.unet, models.params["unet"]
    x, t, layers, contexts = _unet_inputs(unet)
    assert len(layers) == 16
    same = jnp.broadcast_to(contexts[0], contexts.shape)
    plain = jax.jit(lambda p: unet.apply({"params": p}, x, t, contexts[0]))(params)
    ours = jax.jit(lambda p, c: _per_layer_call(unet, p, x, t, layers, c))(params, same)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=0, atol=1e-6)


def test_layer_k_reads_context_k():
    """Each attn2 call's context, recorded by an outer interceptor, is the k-th context for
    the k-th layer (by path), and the output equals a hand-made reference that feeds each attn2
    its own context through an interceptor of its own."""
    models = random_models("micro", 0)
    unet, params = models.unet, models.params["unet"]
    x, t, layers, contexts = _unet_inputs(unet, seed=1)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == "attn2":
            seen["/".join(context.module.path[:-1])] = args[1]
        return next_fun(*args, **kwargs)

    with per_layer_contexts(layers), nn.intercept_methods(record):
        ours = unet.apply({"params": params}, x, t, join_layers(contexts))
    assert set(seen) == set(layers)
    for k, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(seen[layer]), np.asarray(contexts[k]))

    by_path = {layer: contexts[k] for k, layer in enumerate(layers)}

    def reference(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == "attn2":
            return next_fun(args[0], by_path["/".join(context.module.path[:-1])], **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(reference):
        want = unet.apply({"params": params}, x, t, contexts[0])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=0, atol=1e-6)
    # Layer order matters: the contexts reversed give another output.
    reversed_out = _per_layer_call(unet, params, x, t, layers, contexts[::-1])
    assert np.abs(np.asarray(reversed_out) - np.asarray(ours)).max() > 1e-4


def test_per_layer_contexts_refuse_a_u_net_of_other_layers():
    models = random_models("micro", 0)
    unet, params = models.unet, models.params["unet"]
    x, t, layers, contexts = _unet_inputs(unet)
    with pytest.raises(ValueError, match="have no context of their own"):
        _per_layer_call(unet, params, x, t, layers[:-1], contexts[:-1])


def test_encode_per_layer_is_one_ordinary_encoding_per_layer():
    models = random_models("tiny", 0)
    text, text_params = models.text_encoder, models.params["text"]
    rng = np.random.default_rng(2)
    placeholder = text.config.vocab_size  # an id beyond the table
    ids = jnp.asarray([[49406, 320, placeholder, 49407] + [49407] * 73] * 2)
    slots = placeholder_slots(ids, [placeholder])
    learned = jnp.asarray(rng.standard_normal((3, 1, text.config.hidden_size)), jnp.float32)
    hidden = encode_per_layer(text, text_params, ids, learned, slots)
    assert hidden.shape == (3, 2, 77, text.config.hidden_size)
    for k in range(3):
        want = encode_with_learned(text, text_params, ids, learned[k], slots)
        np.testing.assert_allclose(np.asarray(hidden[k]), np.asarray(want), atol=1e-5)


# --- The step ----------------------------------------------------------------------------------

def _setup(num_concepts: int = 1, per_run=None):
    from core_jax.train.synthetic import random_setup

    return random_setup(preset="tiny", unet_overrides={"layers_per_block": 1},
                        num_concepts=num_concepts, batch_size=2, methods=("xti",),
                        weight_decay=1e-2, per_run=per_run)


@pytest.mark.slow
def test_a_step_trains_every_layers_vectors_and_nothing_else():
    setup = _setup()
    params = setup.state.params
    assert set(params) == {"embeds", "xti"} and set(setup.program.trains) == {"xti"}
    first = np.asarray(params["xti"])  # [C, L, V, D]
    num_layers = len(cross_attention_layers(setup.unet))
    assert first.shape == (1, num_layers, 1, setup.data.super_embed.shape[-1])
    np.testing.assert_array_equal(first, np.broadcast_to(
        np.asarray(setup.data.super_embed)[:, None, None], first.shape))  # init: super-category
    frozen_before = jax.device_get(setup.frozen)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    assert set(history[0]) >= {"diffusion", "loss"} and np.isfinite(history[-1]["diffusion"]).all()
    after = np.asarray(state.params["xti"])
    moved = np.abs(after - first).max(axis=(0, 2, 3))  # per layer
    assert (moved > 0).all(), moved
    assert len({after[0, k].tobytes() for k in range(num_layers)}) == num_layers  # all differ
    # "embeds" is not trained: it follows the layers' mean (the hook), the stand-in export.
    np.testing.assert_allclose(state.params["embeds"], after.mean(axis=1), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(setup.frozen))


@pytest.mark.slow
def test_packed_xti_runs_equal_each_alone():
    """Two runs at learning rates 3x apart packed, and each alone: losses and gradient norms
    to 1e-5 relative, vectors to 2e-4 relative L2 (tests/test_svdiff.py says why); a mix-up of
    the runs moves the vectors by whole updates."""
    per_run = [{"learning_rate": 5e-3}, {"learning_rate": 1.5e-2}]
    packed = _setup(2, per_run)
    step_fn = packing.one_device_step(packed)
    together, history_together = packing.run_steps(packed, step_fn, 3)
    assert step_fn.jitted._cache_size() == 1
    for c in range(2):
        alone = packing.alone(_setup(2, per_run), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 3)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("loss", "grad_norm"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-5)
        want = np.asarray(together.params["xti"][c])
        error = np.linalg.norm(np.asarray(state.params["xti"][0]) - want) / np.linalg.norm(want)
        assert error < 2e-4, error
    start = np.asarray(packed.state.params["xti"])
    steps = [np.abs(np.asarray(together.params["xti"][c]) - start[c]).max() for c in (0, 1)]
    assert steps[1] > 2 * steps[0]


def test_xti_refuses_core_and_sdxl_in_one_line():
    from core_jax.config import stage_config
    from core_jax.methods import Settings, get_method

    stage = stage_config(("xti", "core"), learning_rate=5e-3).to_dict()
    with pytest.raises(InputError, match="xti cannot share a stage with core"):
        get_method("xti").terms(Settings(stage))
    stage = stage_config(("textual_inversion", "xti"), learning_rate=5e-3).to_dict()
    with pytest.raises(InputError, match="with textual_inversion"):
        get_method("xti").terms(Settings(stage))
    alone = stage_config(("xti",), learning_rate=5e-3).to_dict()
    with pytest.raises(InputError, match="one text encoder"):
        get_method("xti").terms(Settings(alone, encoder_widths=(768, 1280)))
    assert [t.name for t in get_method("xti").terms(Settings(alone))] == ["diffusion"]


# --- Export and sampling -----------------------------------------------------------------------

def test_export_round_trips_and_the_sampler_draws_the_same_with_loaded_vectors(tmp_path):
    from core_jax.sample import generate, random_pipeline

    pipeline = random_pipeline("micro")
    layers = list(cross_attention_layers(pipeline.unet))
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((len(layers), 1, pipeline.embed_dim)).astype(np.float32)
    path = export.save_xti_embeds(tmp_path, "<s*>", layers, vectors)
    assert path == tmp_path / export.XTI_NAME
    state = load_file(path)
    assert set(state) == {export.xti_layer_name(layer) for layer in layers}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in state
    placeholder, loaded = export.load_xti_embeds(tmp_path, layers)
    assert placeholder == "<s*>"
    np.testing.assert_array_equal(loaded, vectors)
    with pytest.raises(InputError, match="not this U-Net's"):
        export.load_xti_embeds(path, layers[:-1])

    kwargs = dict(steps=2, guidance_scale=3.0, seed=0)
    prompts = ["a photo of a <s*>"]
    in_memory = generate(pipeline, prompts, jnp.asarray(vectors), **kwargs)
    from_file = generate(pipeline, prompts, loaded, **kwargs)
    np.testing.assert_array_equal(from_file, in_memory)
    # Equal layers draw what the one vector draws; different layers draw something else.
    equal = np.broadcast_to(vectors[:1], vectors.shape)
    np.testing.assert_array_equal(generate(pipeline, prompts, equal, **kwargs),
                                  generate(pipeline, prompts, vectors[0], **kwargs))
    assert np.any(in_memory != generate(pipeline, prompts, vectors[0], **kwargs))


# --- End to end --------------------------------------------------------------------------------

MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=3", "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {}',)", "--config.log_every=1",
    "--config.checkpoint_every=3",
]


@pytest.mark.slow
def test_core_jax_train_with_xti_tiny_exports_per_layer_vectors(tmp_path):
    """`core-jax train --config configs/xti_tiny.py` shrunk to the micro preset and 3 steps:
    xti_embeds.safetensors holds the checkpoint's vectors, every layer's moved;
    learned_embeds.safetensors their mean; `core-jax export` writes the same file and
    `core-jax sample` draws with it."""
    import orbax.checkpoint as ocp

    from core_jax.train.outputs import export_run, sample_run

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config", str(ROOT / "configs/xti_tiny.py"),
         "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"diffusion"' in (workdir / "metrics.jsonl").read_text()
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options) as m:
        state = m.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "xti"}
    trained = np.asarray(state["params"]["xti"])[0]  # [L, V, D]
    exported = load_file(workdir / export.XTI_NAME)
    assert len(exported) == trained.shape[0] == 4  # micro: 4 cross-attention layers
    from core_jax.models.presets import get_preset
    from core_jax.models.unet import UNet2DConditionModel

    layers = list(cross_attention_layers(UNet2DConditionModel(get_preset("micro").unet)))
    _, loaded = export.load_xti_embeds(workdir, layers)
    np.testing.assert_array_equal(loaded, trained)
    np.testing.assert_allclose(load_file(workdir / "learned_embeds.safetensors")["<s*>"],
                               trained.mean(axis=0), rtol=1e-6)
    written = export_run(workdir, tmp_path / "export")
    assert tmp_path / "export" / export.XTI_NAME in written
    again = load_file(tmp_path / "export" / export.XTI_NAME)
    for key, value in exported.items():
        np.testing.assert_array_equal(again[key], value)
    grid = sample_run(workdir, ["a S* in the jungle"], num_images=1, steps=2, sampler=None,
                      guidance_scale=None, seed=0, out=tmp_path / "grid.png", say=lambda _: None)
    assert grid.is_file()


@pytest.mark.slow
def test_a_sweep_of_xti_neti_and_core_runs_compiles_one_program_per_group(tmp_path):
    """One concept x three settings (XTI alone, NeTI alone, CoRe) x two learning rates: three
    groups by method set, each one pack of 2 runs and one compiled program, on the test
    session's 8 devices; an XTI run and a NeTI run trained alone on one device (`core-jax
    train` of the run's config.json) equal the sweep's."""
    from core_jax.config import base_config
    from core_jax.methods import neti
    from core_jax.train.sweep import sweep

    c = base_config()
    c.model.preset = "micro"
    c.data.resolution, c.data.num_views = 16, 4
    c.stage1.steps, c.stage1.batch_size = 2, 2
    c.stage1.rescale_start, c.stage1.rescale_end = 1, 2
    c.stage2.steps = 0
    c.sample.at_end = False
    c.log_every = c.checkpoint_every = 2
    c.stage1.update(neti.DEFAULTS)  # the NeTI runs' keys (the others ignore them)
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (
        dict(name="chelsea", images="builtin:chelsea", super_category="cat", templates="animate"),
    )
    c.sweep.settings = (
        dict(name="xti", overrides={"stage1.methods": ("xti",), "stage1.lambda_emb": 0.0,
                                    "stage1.lambda_attn": 0.0, "stage1.lambda_pairwise": 0.0,
                                    "stage1.lambda_hinge": 0.0, "stage1.rescale_end": 0}),
        dict(name="neti", overrides={"stage1.methods": ("neti",), "stage1.lambda_emb": 0.0,
                                     "stage1.lambda_attn": 0.0, "stage1.lambda_pairwise": 0.0,
                                     "stage1.lambda_hinge": 0.0, "stage1.rescale_end": 0}),
        dict(name="core", overrides={}),
    )
    c.sweep.grid = (("stage1.learning_rate", (5e-3, 1e-2)),)
    c.sweep.pack = 2
    c.sweep.concept_shards = 0
    summary = sweep(c, tmp_path)
    assert summary["runs"] == 6 and len(summary["groups"]) == 3
    assert [g["compilations"] for g in summary["groups"]] == [[1], [1], [1]]
    assert all(r["status"] == "done" for r in summary["results"])
    runs = {p.name: p for p in (tmp_path / "runs").iterdir()}
    xti_runs = [p for name, p in runs.items() if "xti" in name]
    neti_runs = [p for name, p in runs.items() if "neti" in name]
    core_runs = [p for name, p in runs.items() if "core" in name]
    assert len(xti_runs) == len(neti_runs) == len(core_runs) == 2
    assert all((p / export.XTI_NAME).is_file() for p in xti_runs)
    assert all((p / export.NETI_NAME).is_file() for p in neti_runs)
    assert not any((p / export.XTI_NAME).exists() for p in core_runs + neti_runs)
    assert not any((p / export.NETI_NAME).exists() for p in core_runs + xti_runs)
    assert jax.device_count() == 8 and summary["mesh"]["data"] > 1
    # The sweep split rows over devices: fp32 summation order differs from one device's.
    one_device = {**os.environ, "XLA_FLAGS": ""}
    for run, name in ((xti_runs[0], export.XTI_NAME), (neti_runs[0], export.NETI_NAME)):
        alone = tmp_path / "alone" / run.name
        cmd = [sys.executable, "-m", "core_jax", "train", "--config",
               f"{ROOT / 'configs/from_json.py'}:{run / 'config.json'}", "--workdir", str(alone)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=one_device, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        # Measured once: 4 of NeTI's 4096 bypass weights 7e-6 apart (lr 5e-3).
        lr = json.loads((run / "config.json").read_text())["stage1"]["learning_rate"]
        assert_within_one_adam_step(load_file(alone / name), load_file(run / name), lr)

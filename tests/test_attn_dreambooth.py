"""AttnDreamBooth: the regularizer by hand (numpy, the official code's reduction) with its "token
right after [V]" selection; zero at equal statistics; numerical gradients; the caption pass's
statistics against a separate U-Net call; stage 1 moving only S*, stage 2 only the
cross-attention projections (q, k, v, out) with S* fixed, stage 3 the whole U-Net from stage 2's
merged weights; the terms in the metrics; packed runs equal to each alone; the configs; and
`core-jax train` with configs/attn_dreambooth_tiny.py end to end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import packing
import pytest
from flax import traverse_util
from jax.test_util import check_grads

from core_jax import losses
from core_jax.config import stage_config
from core_jax.methods.attn_dreambooth import (
    GROUP,
    cross_attention_params,
    statistic_loss,
    token_after,
)
from core_jax.models.unet import cross_attention_stats
from core_jax.train.passes import Passes, closure, draw_batch, merged_unet
from core_jax.train.stages import build_program, stage_numbers, stage_params
from core_jax.train.step import init_state

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a photo of a {} {cls}"
STAGE1 = ("textual_inversion", "attn_dreambooth")
STAGE2 = ("cross_attention_finetune", "attn_dreambooth")
STAGE3 = ("unet_finetune", "attn_dreambooth")


# --- The regularizer by hand -----------------------------------------------------------------

def _numpy_regularizer(mu, var, placeholders, w_mean, w_var):
    """The official code's loop (train_attndreambooth.py l.~1456-1468) in numpy: for each layer
    and sample, mse over the [V] vectors against the ONE token after them, weighted; summed
    over samples; divided by the number of layers."""
    mu, var = np.asarray(mu, np.float64), np.asarray(var, np.float64)
    span = np.flatnonzero(placeholders)
    start, n = span[0], len(span)
    total = 0.0
    for layer in range(mu.shape[0]):
        for b in range(mu.shape[1]):
            m, v = mu[layer, b], var[layer, b]
            mean_loss = np.mean((m[start:start + n] - m[start + n]) ** 2)
            var_loss = np.mean((v[start:start + n] - v[start + n]) ** 2)
            total += mean_loss * w_mean + var_loss * w_var
    return total / mu.shape[0]


def _stats(seed, shape=(4, 3, 10)):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.0, 0.3, shape).astype(np.float32),
            rng.uniform(0.0, 0.05, shape).astype(np.float32))


@pytest.mark.parametrize("span", [(4,), (4, 5), (2, 3, 4)])
def test_regularizer_equals_the_codes_loop(span):
    """Two placeholder spans and one vector: the term per statistic (its inputs as the step
    hands them for one concept) and the weighted loss against the code's loop; the target is
    the token right after the last vector, never one of the others."""
    mu, var = _stats(0)
    placeholders = np.zeros(10, bool)
    placeholders[list(span)] = True
    assert int(token_after(jnp.asarray(placeholders))) == span[-1] + 1
    want = _numpy_regularizer(mu, var, placeholders, 2.0, 5.0)
    parts = [statistic_loss(jnp.asarray(s), jnp.asarray(placeholders), jnp.float32(1.0))
             for s in (mu, var)]
    chex.assert_trees_all_close(2.0 * parts[0] + 5.0 * parts[1], np.float32(want), rtol=1e-5)
    mask = np.broadcast_to(placeholders, mu.shape[1:])
    after = span[-1] + 1
    full = losses.attention_mean_var_loss(mu, var, mu[..., after:after + 1],
                                          var[..., after:after + 1], mask, 2.0, 5.0)
    chex.assert_trees_all_close(full, np.float32(want), rtol=1e-5)
    # The code's batch sum: twice the rows, twice the loss; 4 data shards scale the local sum.
    doubled = np.concatenate([mu, mu], axis=1)
    chex.assert_trees_all_close(
        statistic_loss(jnp.asarray(doubled), jnp.asarray(placeholders), jnp.float32(1.0)),
        2 * parts[0], rtol=1e-6)
    chex.assert_trees_all_close(
        statistic_loss(jnp.asarray(mu), jnp.asarray(placeholders), jnp.float32(4.0)),
        4 * parts[0], rtol=1e-6)
    # Another token than the one after S* moving changes nothing.
    moved = mu.copy()
    moved[..., after + 1] += 0.1
    chex.assert_trees_all_close(
        statistic_loss(jnp.asarray(moved), jnp.asarray(placeholders), jnp.float32(1.0)),
        parts[0], rtol=0, atol=0)


def test_regularizer_is_zero_at_equal_statistics_and_without_placeholders():
    mu, var = _stats(1)
    placeholders = np.zeros(10, bool)
    placeholders[[3, 4]] = True
    mu[..., 3] = mu[..., 5]
    mu[..., 4] = mu[..., 5]
    assert float(statistic_loss(jnp.asarray(mu), jnp.asarray(placeholders), 1.0)) == 0.0
    assert float(statistic_loss(jnp.asarray(var), jnp.asarray(placeholders), 1.0)) > 1e-6
    assert float(statistic_loss(jnp.asarray(var), jnp.zeros(10, bool), 1.0)) == 0.0


def test_regularizer_gradients_flow_to_both_sides():
    """Numerical gradients (float64) of the weighted loss in the statistics and the targets;
    neither side is detached (the code detaches neither): both get a gradient."""
    with jax.enable_x64(True):
        mu, var = (s.astype(np.float64) for s in _stats(2))
        mask = np.zeros((3, 10), bool)
        mask[:, 4:6] = True
        targets = (mu[..., 6:7], var[..., 6:7])
        check_grads(lambda m, v, tm, tv: losses.attention_mean_var_loss(m, v, tm, tv, mask,
                                                                        2.0, 5.0),
                    (mu, var, *targets), order=1, modes=("rev",))
        grads = jax.grad(lambda s: statistic_loss(s, jnp.asarray(mask[0]), 1.0))(mu)
        assert np.abs(grads[..., 4:6]).min() > 0 and np.abs(grads[..., 6]).min() > 0
        assert np.all(grads[..., 7:] == 0) and np.all(grads[..., :4] == 0)


# --- Setups ----------------------------------------------------------------------------------

def _setup(methods=STAGE1, per_run=None, **stage):
    """Two runs of the tiny preset (one layer per block: 10 cross-attention layers) on "a photo
    of a S* <cls>" ("cat" and "dog")."""
    from core_jax.train.synthetic import random_setup

    keys = {"lambda_attn_mean": 2.0, "lambda_attn_var": 5.0, "weight_decay": 1e-2, **stage}
    return random_setup(
        preset="tiny", unet_overrides={"layers_per_block": 1}, num_concepts=2, batch_size=2,
        methods=methods, caption=CAPTION, per_run=per_run or [
            {"learning_rate": 1e-3}, {"learning_rate": 3e-3, "lambda_attn_mean": 0.5}], **keys)


def _next_stage(setup, methods, **keys):
    """`setup` moved on to a stage listing `methods`: its params enter it as a run's do
    (`stage_params`), the program and numbers are the new stage's."""
    stages = [stage_config(methods, batch_size=2, **keys)] * 2
    program = build_program(stages, setup.program.models, setup.schedule.prediction_type)
    params = stage_params([setup.program, program], 1, setup.state.params, setup.data,
                          setup.frozen, 1, setup.state.rng)
    return dataclasses.replace(setup, program=program, numbers=stage_numbers(stages),
                               state=init_state(program, params, setup.state.rng))


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _changed(a, b) -> set:
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    return {p for p in flat_a if not np.array_equal(_bits(flat_a[p]), _bits(flat_b[p]))}


def _projection_leaves(unet_params) -> set:
    return set(traverse_util.flatten_dict(cross_attention_params(unet_params)))


# --- The caption pass's statistics -------------------------------------------------------------

def test_caption_placeholders_point_at_the_class_word():
    """In "a photo of a S* cat" / "... S* dog" the token after S* is each concept's class."""
    from core_jax.text import load_tokenizer

    setup = _setup()
    tokenizer = load_tokenizer()
    ids = np.asarray(setup.data.caption_ids)
    batch = draw_batch(setup.state.rng, setup.state.step, setup.data, setup.schedule,
                       jnp.arange(2))
    passes = Passes(setup.state.params, setup.frozen, batch, setup.data, setup.schedule,
                    setup.program.models, closure({"caption_placeholders"}), 1)
    placeholders = np.asarray(passes["caption_placeholders"])
    for c, word in enumerate(("cat", "dog")):
        assert placeholders[c].sum() == 1
        after = int(token_after(jnp.asarray(placeholders[c])))
        assert ids[c, after] == tokenizer.convert_tokens_to_ids(f"{word}</w>")


@pytest.fixture(scope="module")
def stage2_setup():
    return _setup(methods=STAGE2)


@pytest.mark.parametrize("stage", ["frozen U-Net", "cross-attention group"])
def test_caption_stats_equal_a_separate_unet_call(stage, stage2_setup):
    """The statistics collected by the caption pass (one call with caption_pred) equal those of
    a separate call of the U-Net (the frozen one, or each run's with its projections merged) on
    the same noisy latents, timesteps and caption encodings; and so does the prediction."""
    setup = stage2_setup
    params = {"embeds": setup.state.params["embeds"]}
    if stage == "cross-attention group":  # projections away from the frozen ones: they matter
        params[GROUP] = jax.tree.map(lambda x: x * 1.3, setup.state.params[GROUP])
    batch = draw_batch(setup.state.rng, setup.state.step, setup.data, setup.schedule,
                       jnp.arange(2))
    names = ("caption_pred", "caption_stats", "caption_stats_var", "caption_hidden")

    @jax.jit
    def caption_pass(params, frozen, batch, data):
        passes = Passes(params, frozen, batch, data, setup.schedule, setup.program.models,
                        closure(set(names)), 1)
        return {name: passes[name] for name in names} | {
            "x_t": passes.per_concept(passes.x_t)}

    @jax.jit
    def separate_call(run, frozen_unet, x_t, t, hidden):
        ctx = jnp.broadcast_to(hidden, (x_t.shape[0],) + hidden.shape)
        pred, sown = setup.unet.apply({"params": merged_unet(run, frozen_unet)}, x_t, t, ctx,
                                      mutable=["attn_stats"])
        return pred, {kind: cross_attention_stats(sown, kind) for kind in ("mean", "var")}

    got = jax.device_get(caption_pass(params, setup.frozen, batch, setup.data))
    t = np.asarray(batch.timesteps).reshape(2, 2)
    for c in range(2):
        run = jax.tree.map(lambda x, c=c: x[c], params)
        pred, stats = separate_call(run, setup.frozen["unet"], got["x_t"][c], t[c],
                                    got["caption_hidden"][c])
        np.testing.assert_allclose(got["caption_pred"][c], pred, rtol=0, atol=2e-5)
        for name, kind in (("caption_stats", "mean"), ("caption_stats_var", "var")):
            want = np.asarray(stats[kind])  # [L, b, T]
            assert got[name][c].shape == want.shape and want.shape[0] == 10
            np.testing.assert_allclose(got[name][c], want, rtol=1e-5, atol=1e-7)
    assert np.all(got["caption_stats_var"] >= -1e-7) and np.any(got["caption_stats_var"] > 0)


# --- The stages ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1():
    setup = _setup(lambda_attn_var=0.0)
    before = jax.device_get(setup.state.params)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    return setup, before, state, history


def test_stage1_trains_only_the_token_with_the_mean_term(stage1):
    setup, before, state, history = stage1
    assert set(state.params) == {"embeds"}
    assert np.abs(state.params["embeds"] - before["embeds"]).min() > 0
    for metrics in history:
        assert "attn_var" not in metrics  # weight 0 in every run: the term is absent
        assert np.all(np.isfinite(metrics["attn_mean"])) and np.all(metrics["attn_mean"] > 0)
        np.testing.assert_allclose(
            metrics["loss"], metrics["diffusion"] + np.array([2.0, 0.5]) * metrics["attn_mean"],
            rtol=1e-6)


@pytest.fixture(scope="module")
def stage2(stage2_setup):
    setup = stage2_setup
    before = jax.device_get((setup.frozen, setup.state.params))
    step_fn = packing.one_device_step(setup)
    state, history = packing.run_steps(setup, step_fn, 3)
    assert step_fn.jitted._cache_size() == 1
    return setup, before, state, history


@pytest.mark.slow
def test_stage2_trains_only_the_cross_attention_projections(stage2):
    """The state holds S* and the group; S* is bit for bit as before; each run's U-Net differs
    from the frozen one at exactly every to_q, to_k, to_v, to_out_0 kernel and to_out_0 bias of
    every attn2 layer, at every entry; both terms are in the metrics."""
    setup, (frozen, params), state, history = stage2
    assert set(state.params) == {"embeds", GROUP}
    np.testing.assert_array_equal(_bits(state.params["embeds"]), _bits(params["embeds"]))
    leaves = _projection_leaves(frozen["unet"])
    assert {p[-2:] for p in leaves} == {("to_q", "kernel"), ("to_k", "kernel"),
                                        ("to_v", "kernel"), ("to_out_0", "kernel"),
                                        ("to_out_0", "bias")}
    assert len(leaves) == 10 * 5 and all(p[-3] == "attn2" for p in leaves)
    base = traverse_util.flatten_dict(frozen["unet"])
    for c in range(2):
        run = jax.tree.map(lambda x, c=c: x[c], state.params)
        merged = jax.device_get(merged_unet(run, frozen["unet"]))
        assert _changed(merged, frozen["unet"]) == leaves
        flat = traverse_util.flatten_dict(merged)
        for path in leaves:
            assert np.all(flat[path] != base[path]), path
    for metrics in history:
        for name in ("diffusion", "attn_mean", "attn_var"):
            assert np.all(np.isfinite(metrics[name])) and np.all(metrics[name] > 0), name
        np.testing.assert_allclose(
            metrics["loss"], metrics["diffusion"] + np.array([2.0, 0.5]) * metrics["attn_mean"]
            + 5.0 * metrics["attn_var"], rtol=1e-6)


def _vector(tree, c: int) -> np.ndarray:
    return np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_stage2_packed_runs_equal_each_alone(stage2):
    """Each run cut out of the pack and trained alone: loss, diffusion and gradient norm to
    1e-5 relative, the projections as a vector to 2e-4 relative L2 (the bounds
    tests/test_custom_diffusion.py and tests/test_lora.py argue). The regularizer terms to 1e-4:
    each statistic's variance is E[p^2] - mu^2, which cancels, and the terms square differences
    of such near-equal statistics, so another summation order's 1e-7 shows magnified (observed
    1.4e-5 on attn_var). The runs differ (learning rates 3x apart, mean weights 2 and 0.5), so a
    mix-up would show."""
    _, (_, before), together, history_together = stage2
    for c in range(2):
        alone = packing.alone(_setup(methods=STAGE2), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 3)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("loss", "diffusion", "grad_norm", "attn_mean", "attn_var"):
                rtol = 1e-4 if name.startswith("attn") else 1e-5
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=rtol,
                                           err_msg=name)
        want = _vector(together.params[GROUP], c) - _vector(before[GROUP], c)
        got = _vector(state.params[GROUP], 0) - _vector(before[GROUP], c)
        assert np.linalg.norm(got - want) < 2e-4 * np.linalg.norm(want)
    moved = [_vector(together.params[GROUP], c) - _vector(before[GROUP], c) for c in range(2)]
    assert np.linalg.norm(moved[0] - moved[1]) > 0.5 * np.linalg.norm(moved[0])


@pytest.mark.slow
def test_stage3_starts_from_the_stage2_unet_and_trains_all_of_it(stage2):
    """Stage 3 (unet_finetune after the group): each run's U-Net copy starts as the frozen U-Net
    with its stage-2 projections merged, and the group is gone (folded in); a step then moves
    leaves outside attn2 too, S* stays fixed, both terms are logged."""
    setup, (frozen, _), state2, _ = stage2
    setup = dataclasses.replace(setup, state=jax.tree.map(jnp.asarray, state2))
    setup3 = _next_stage(setup, STAGE3, learning_rate=1e-4, lambda_attn_mean=2.0,
                         lambda_attn_var=5.0)
    params = jax.device_get(setup3.state.params)
    assert set(params) == {"embeds", "unet"}
    for c in range(2):
        run2 = jax.tree.map(lambda x, c=c: x[c], state2.params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)),
                     jax.tree.map(lambda x, c=c: x[c], params["unet"]),
                     jax.device_get(merged_unet(run2, frozen["unet"])))
    state3, history = packing.run_steps(setup3, packing.one_device_step(setup3), 1)
    np.testing.assert_array_equal(_bits(state3.params["embeds"]), _bits(params["embeds"]))
    changed = _changed(jax.tree.map(lambda x: x[0], state3.params["unet"]),
                       jax.tree.map(lambda x: x[0], params["unet"]))
    outside = changed - _projection_leaves(frozen["unet"])
    assert len(changed) > 0.9 * len(traverse_util.flatten_dict(frozen["unet"])) and outside
    assert all(np.isfinite(history[0][n]).all() and (history[0][n] > 0).all()
               for n in ("diffusion", "attn_mean", "attn_var"))


# --- Configs and end to end ----------------------------------------------------------------------

def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_sd21_config_holds_the_codes_recipe():
    """configs/attn_dreambooth_sd21.py: METHODS.md section 4's (the official script's) numbers
    per stage, and a config the run's checks accept."""
    from core_jax.train import setup as run_setup

    c = _config("attn_dreambooth_sd21")
    want = {
        "stage1": (STAGE1, 60, 1e-3, 0.1, 0.0),
        "stage2": (STAGE2, 100, 2e-5, 2.0, 5.0),
        "stage3": (STAGE3, 500, 2e-6, 2.0, 5.0),
    }
    for name, (methods, steps, lr, w_mean, w_var) in want.items():
        s = c[name]
        assert (s.methods, s.steps, s.batch_size, s.weight_decay) == (methods, steps, 8, 1e-2)
        assert (s.learning_rate, s.lambda_attn_mean, s.lambda_attn_var) == (lr, w_mean, w_var)
        assert s.clip_norm == 0.0
    assert c.concept.caption == CAPTION and c.data.resolution == 512
    assert (c.data.rotate_p, c.data.max_angle, c.data.flip_p) == (0.75, 45.0, 0.25)
    c.concept.super_category = "teapot"
    run_setup.check_config(c)


MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    *[f"--config.stage{k}.{key}" for k in (1, 2, 3) for key in ("steps=2", "batch_size=2")],
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {} {cls}',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


@pytest.mark.slow
def test_core_jax_train_with_attn_dreambooth_tiny_exports_token_and_unet(tmp_path):
    """`core-jax train --config configs/attn_dreambooth_tiny.py` shrunk to the micro preset and
    2 steps a stage: the terms logged per stage (attn_var from stage 2 on), the last checkpoint
    holds S* and the U-Net copy only, the U-Net folder and the learned token are written, and
    the exported U-Net is the checkpoint's."""
    import orbax.checkpoint as ocp

    from core_jax import weights

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/attn_dreambooth_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for stage, step in ((1, 2), (2, 4), (3, 6)):
        last = [r for r in records if r.get("step") == step][-1]
        assert np.isfinite(last["diffusion"]) and last["attn_mean"] > 0, (stage, last)
        assert ("attn_var" in last) == (stage > 1), (stage, last)
    for stage in (1, 2, 3):
        assert (workdir / "samples" / f"stage{stage}_step{2 * stage:06d}.png").is_file()
    assert (workdir / "learned_embeds.safetensors").is_file()

    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options) as m:
        state = m.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "unet"}
    _, exported = weights.load_unet(workdir)
    checkpointed = jax.tree.map(lambda x: np.asarray(x)[0], state["params"]["unet"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported), checkpointed)

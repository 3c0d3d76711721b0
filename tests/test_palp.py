"""PALP (`palp`): LoRA and S* with the prompt-aligned score-sampling term. The term's value and
gradient are Eq. 6's (a hand value, a numpy writing, zero where teacher and student agree, no
gradient into either score, jit and vmap); x^_0 is the caption pass's and carries the gradient,
x^_t and the two scores are constants, the teacher is the frozen U-Net whatever the adapters
hold; a step logs the term and a zero weight changes the adapters' update; packed runs with
different target prompts equal each alone; `core-jax train` with configs/palp_tiny.py end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import packing
import pytest
from flax import traverse_util
from jax.test_util import check_grads

from core_jax.config import base_config, stage_config
from core_jax.diffusion import denoised, make_schedule
from core_jax.errors import InputError
from core_jax.methods.base import Settings
from core_jax.methods.palp import DEFAULTS, METHOD, prompt_aligned_score_loss, target_prompt
from core_jax.train.passes import Passes, draw_batch
from core_jax.train.stages import build_program

ROOT = Path(__file__).resolve().parents[1]


def _numpy_loss(x0, teacher, student, weight):
    """Eq. 6 written out: value 0.5 mean((T - S)^2), gradient in x0 w (T - S) / N."""
    residual = teacher.astype(np.float64) - student.astype(np.float64)
    value = 0.5 * np.mean(residual ** 2)
    grad = weight.reshape((-1,) + (1,) * (x0.ndim - 1)) * residual / x0.size
    return value, grad


def test_the_term_by_hand_and_in_numpy():
    x0 = jnp.asarray([[5.0, -3.0]])
    teacher, student = jnp.asarray([[1.0, 2.0]]), jnp.asarray([[0.0, 0.0]])
    value, grad = jax.value_and_grad(prompt_aligned_score_loss)(x0, teacher, student,
                                                                jnp.asarray([2.0]))
    np.testing.assert_allclose(value, 0.5 * (1 + 4) / 2)  # 1.25, whatever x0 is
    np.testing.assert_allclose(grad, [[2 * 1 / 2, 2 * 2 / 2]])  # w (T - S) / N
    rng = np.random.default_rng(0)
    x0, teacher, student = rng.standard_normal((3, 4, 3, 3, 2)).astype(np.float32)
    weight = rng.uniform(0.1, 3.0, 4).astype(np.float32)
    args = [jnp.asarray(a) for a in (x0, teacher, student, weight)]
    want_value, want_grad = _numpy_loss(x0, teacher, student, weight)
    np.testing.assert_allclose(prompt_aligned_score_loss(*args), want_value, rtol=1e-5)
    grads = jax.grad(prompt_aligned_score_loss, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(grads[0], want_grad, rtol=1e-5, atol=1e-9)
    for g in grads[1:]:  # the scores and the weight are constants
        np.testing.assert_array_equal(g, 0.0)
    # Teacher == student: nothing to distil.
    same = jax.value_and_grad(prompt_aligned_score_loss)(args[0], args[1], args[1], args[3])
    np.testing.assert_array_equal(same[0], 0.0)
    np.testing.assert_array_equal(same[1], 0.0)
    # jit and vmap (over concepts, as the step does)
    np.testing.assert_allclose(jax.jit(prompt_aligned_score_loss)(*args), want_value, rtol=1e-5)
    stacked = [jnp.stack([a, a[::-1]]) for a in args]
    per = jax.vmap(prompt_aligned_score_loss)(*stacked)
    np.testing.assert_allclose(per[1], _numpy_loss(*(np.asarray(a[::-1]) for a in args))[0],
                               rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_gradient_reaches_the_prediction_through_x0(prediction_type):
    """The differentiable part: prediction -> x^_0 (Eq. 2), checked numerically; through it the
    term's gradient in the prediction is w (T - S) dx^_0/dpred / N, with PALP's rescaling
    w = sqrt(SNR) making it -(T - S) / N for epsilon prediction at every t."""
    schedule = make_schedule(prediction_type=prediction_type)
    rng = np.random.default_rng(1)
    pred, x_t, teacher, student = (jnp.asarray(a) for a in
                                   rng.standard_normal((4, 3, 2, 2, 2)).astype(np.float32))
    t = jnp.asarray([10, 500, 990])
    check_grads(lambda p: denoised(schedule, p, x_t, t)[0], (pred,), order=1, modes=["rev"],
                atol=1e-2, rtol=1e-2)
    [_, term] = METHOD.terms(Settings(dict(DEFAULTS), prediction_type))
    numbers = {"palp_teacher_guidance": jnp.asarray(1.0), "palp_student_guidance": 1.0}
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    pair = lambda cond: jnp.stack([jnp.zeros_like(cond), cond])  # noqa: E731  guidance 1: cond

    def through_x0(p):
        return term.fn(denoised(schedule, p, x_t, t)[0], pair(teacher), pair(student), snr,
                       numbers)

    grad = np.asarray(jax.grad(through_x0)(pred), np.float64)
    alpha_bar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    a, s = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    dx0 = -s / a if prediction_type == "epsilon" else -s  # dx^_0 / dpred
    residual = np.asarray(teacher, np.float64) - np.asarray(student, np.float64)
    np.testing.assert_allclose(grad, (a / s) * residual * dx0 / pred.size, rtol=1e-4, atol=1e-9)
    if prediction_type == "epsilon":
        np.testing.assert_allclose(grad, -residual / pred.size, rtol=1e-4, atol=1e-9)


def test_the_guidance_scales_are_eq5s():
    [_, term] = METHOD.terms(Settings(dict(DEFAULTS, palp_rescale=False)))
    rng = np.random.default_rng(2)
    x0, tu, tc, su, sc = (jnp.asarray(a) for a in rng.standard_normal((5, 2, 3)))
    numbers = {"palp_teacher_guidance": jnp.asarray(15.0), "palp_student_guidance": 7.5}
    got = term.fn(x0, jnp.stack([tu, tc]), jnp.stack([su, sc]), jnp.ones(2), numbers)
    teacher = (1 - 15.0) * np.asarray(tu) + 15.0 * np.asarray(tc)
    student = (1 - 7.5) * np.asarray(su) + 7.5 * np.asarray(sc)
    np.testing.assert_allclose(got, 0.5 * np.mean((teacher - student) ** 2), rtol=1e-5)


def test_the_target_prompt_names_the_class_never_s_star():
    assert target_prompt("a sketch of a {cls} in Paris", "cat") == "a sketch of a cat in Paris"
    assert target_prompt("an anime drawing of a dog", "cat") == "an anime drawing of a dog"
    for bad in ("a sketch of a {}", "a {cls} {x}", " "):
        with pytest.raises(InputError, match="palp_prompt"):
            target_prompt(bad, "cat")


def test_runs_differing_in_their_target_prompt_are_one_sweep_group(tmp_path):
    from core_jax.train.loop import Run
    from core_jax.train.sweep import group_key

    def run(prompt: str, guidance: float) -> Run:
        config = base_config()
        config.stage1 = stage_config(("textual_inversion", "palp"), palp_prompt=prompt,
                                     palp_teacher_guidance=guidance)
        return Run("r", config, tmp_path)

    assert group_key(run("a sketch of a {cls}", 15.0)) == group_key(
        run("an oil painting of a {cls} at night", 7.5))
    other = run("a sketch of a {cls}", 15.0)
    other.config.stage1.palp_rescale = False  # static: another program
    assert group_key(other) != group_key(run("a sketch of a {cls}", 15.0))


def _setup(**stage):
    from core_jax.train.synthetic import random_setup

    values = dict(learning_rate=1e-3, lora_rank=4, lora_alpha=4.0)
    return random_setup(preset="micro", batch_size=2, methods=("textual_inversion", "palp"),
                        **{**values, **stage})


def _moved(adapters, seed: int):
    """`adapters` with B drawn too, so the adapted U-Net differs from the frozen one."""
    flat = traverse_util.flatten_dict(adapters.layers)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    flat = {path: (value if path[-1] == "A" else 0.3 * jax.random.normal(k, value.shape))
            for (path, value), k in zip(flat.items(), keys, strict=True)}
    return adapters.replace(layers=traverse_util.unflatten_dict(flat))


def test_the_stage_trains_s_star_and_the_adapters_with_the_term():
    """Built, not compiled: the program has PALP's term and reads its passes, the state holds
    S* and the adapters only, each run's target prompt encoded once beside the empty prompt."""
    setup = _setup()
    assert set(setup.program.trains) == {"embeds", "lora"} == set(setup.state.params)
    assert {t.name for t in setup.program.terms} == {"diffusion", "palp"}
    assert {"palp_x0", "palp_teacher", "palp_student", "snr"} <= setup.program.needs
    assert setup.data.target_hidden.shape == setup.data.null_hidden.shape
    assert setup.data.target_hidden.shape[:2] == (1, 77)
    # A zero weight in every run: the term and its passes are absent from the program.
    off = build_program([stage_config(("textual_inversion", "palp"), lambda_palp=0.0)],
                        setup.program.models, "epsilon")
    assert {t.name for t in off.terms} == {"diffusion"}
    assert not off.needs & {"palp_x0", "palp_teacher", "palp_student"}


@pytest.mark.slow
def test_passes_x0_carries_the_gradient_the_scores_do_not_and_the_teacher_is_frozen():
    setup = _setup()
    batch = draw_batch(setup.state.rng, setup.state.step, setup.data, setup.schedule,
                       jnp.arange(2))
    unet, alphas = setup.program.models.unet, setup.schedule.alphas_cumprod[batch.timesteps]
    trained = {"embeds": setup.state.params["embeds"],
               "lora": _moved(setup.state.params["lora"], 1)}
    at_start = {**trained, "lora": setup.state.params["lora"]}  # B = 0: the frozen U-Net

    def outputs(params):
        p = Passes(params, setup.frozen, batch, setup.data, setup.schedule,
                   setup.program.models, setup.program.needs, 1)
        return p["palp_x0"], p["palp_teacher"], p["palp_student"]

    @jax.jit
    def check(trained, at_start):
        out, vjp = jax.vjp(outputs, trained)
        grads = [vjp(tuple(jnp.ones_like(o) if k == j else jnp.zeros_like(o)
                           for k, o in enumerate(out)))[0] for j in range(3)]
        x0, teacher, student = out
        # The teacher: the frozen U-Net on x^_t (x^_0 noised again with the row's own noise)
        # with the target prompt, whatever the adapters hold.
        x_hat = (jnp.sqrt(alphas)[:, None, None, None] * x0[0]
                 + jnp.sqrt(1 - alphas)[:, None, None, None] * batch.noise)
        context = jnp.broadcast_to(setup.data.target_hidden[0],
                                   (2,) + setup.data.target_hidden.shape[1:])
        frozen_cond = unet.apply({"params": setup.frozen["unet"]}, x_hat, batch.timesteps,
                                 context)
        return grads, teacher, student, outputs(at_start)[2], frozen_cond

    (g_x0, g_teacher, g_student), teacher, student, student0, frozen_cond = check(trained,
                                                                                  at_start)
    for grads in (g_teacher, g_student):  # the scores are constants
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    assert np.abs(g_x0["embeds"]).max() > 0  # x^_0 reaches S* and the adapters
    assert max(np.abs(g).max() for g in jax.tree.leaves(g_x0["lora"])) > 0
    assert teacher.shape == (1, 2, 2) + setup.data.latent_mean.shape[2:]
    np.testing.assert_allclose(teacher[0, 1], frozen_cond, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(student) - np.asarray(student0)).max() > 1e-4  # adapters move it


@pytest.mark.slow
def test_a_step_logs_the_term_and_a_zero_weight_changes_the_adapters_update():
    setup = _setup(lambda_palp=1.0)
    step = packing.one_device_step(setup)
    state = jax.tree.map(jnp.copy, setup.state)
    with_term, metrics = step(state, *setup.args()[1:])
    metrics = jax.device_get(metrics)
    assert metrics["palp"][0] > 0 and np.isfinite(metrics["palp"][0])
    np.testing.assert_allclose(metrics["loss"], metrics["diffusion"] + metrics["palp"], rtol=1e-5)
    numbers = {**setup.numbers, "lambda_palp": jnp.zeros_like(setup.numbers["lambda_palp"])}
    state = jax.tree.map(jnp.copy, setup.state)
    without, metrics0 = step(state, setup.data, numbers, setup.frozen, setup.schedule)
    np.testing.assert_allclose(jax.device_get(metrics0)["loss"], metrics["diffusion"], rtol=1e-5)
    b_with = [x for p, x in traverse_util.flatten_dict(with_term.params["lora"].layers).items()
              if p[-1] == "B"]
    b_without = [x for p, x in traverse_util.flatten_dict(without.params["lora"].layers).items()
                 if p[-1] == "B"]
    assert all(np.abs(np.asarray(b)).max() > 0 for b in b_with)
    diff = max(np.abs(np.asarray(a) - np.asarray(b)).max()
               for a, b in zip(b_with, b_without, strict=True))
    assert diff > 1e-6


@pytest.mark.slow
def test_packed_runs_with_different_target_prompts_equal_each_alone():
    per_run = [{"palp_prompt": "a sketch of a {cls} in Paris"},
               {"palp_prompt": "an oil painting of a {cls} at night", "palp_teacher_guidance": 7.5}]
    setup = _setup(num_concepts=2, per_run=per_run)
    assert not np.allclose(setup.data.target_hidden[0], setup.data.target_hidden[1])
    together, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    for c in range(2):
        alone = packing.alone(_setup(num_concepts=2, per_run=per_run), c)
        state, alone_history = packing.run_steps(alone, packing.one_device_step(alone), 2)
        for h_alone, h_together in zip(alone_history, history, strict=True):
            for name in ("loss", "palp", "diffusion"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-4,
                                           atol=1e-6)
        want = np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(together.params)])
        got = np.concatenate([np.ravel(x[0]) for x in jax.tree.leaves(state.params)])
        assert np.linalg.norm(got - want) < 2e-4 * np.linalg.norm(want)


MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=2", "--config.stage1.batch_size=2",
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a sketch of a {} in Paris',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


@pytest.mark.slow
def test_core_jax_train_with_palp_tiny(tmp_path):
    from safetensors.numpy import load_file

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/palp_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "palp" in r]
    assert {r["step"] for r in steps} == {1, 2}
    assert all(np.isfinite(r["diffusion"]) and r["palp"] > 0 for r in steps)
    names = load_file(workdir / "pytorch_lora_weights.safetensors")
    assert names and all(k.startswith("unet.") for k in names)
    assert (workdir / "learned_embeds.safetensors").is_file()
    assert (workdir / "samples" / "stage1_step000002.png").is_file()

"""The stage-1 step: concepts are independent, sharding changes nothing, one program per config.

Tiny random-weight models with one resnet per block (10 cross-attention layers) keep compile
times down; every code path of the step is still there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.train import step as train_step
from core_jax.train.synthetic import random_stage1_setup

SMALL = dict(preset="tiny", unet_overrides={"layers_per_block": 1})
# Rows batched with other rows go through differently blocked matmuls/convs: allow fp32 noise.
RTOL, ATOL = 2e-5, 1e-6


def _concept(tree, c: int):
    return jax.tree.map(lambda x: x[c : c + 1], tree)


def _run(setup, step_fn, steps: int):
    state, history = jax.tree.map(jnp.copy, setup.state), []  # the step donates its state
    for _ in range(steps):
        state, metrics = step_fn(state, *setup.args()[1:])
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _one_device(setup):
    return train_step.shard_stage1_step(
        train_step.make_mesh(1, jax.devices()[:1]), **setup.step_kwargs()
    )


@pytest.fixture(scope="module")
def two_concepts():
    return random_stage1_setup(
        **SMALL, num_concepts=2, batch_size=8, use_pairwise=True, use_hinge=True,
        weights={"lambda_pairwise": 0.01, "lambda_hinge": 0.1, "hinge_margin": 0.9},
        rescale_start=2, rescale_end=3,
    )


@pytest.fixture(scope="module")
def two_concepts_result(two_concepts):
    frozen_before = jax.device_get(two_concepts.frozen)
    step_fn = _one_device(two_concepts)
    state, history = _run(two_concepts, step_fn, 4)
    # The frozen weights are arguments and stay bitwise what they were.
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(two_concepts.frozen))
    return state, history, step_fn


def test_concepts_trained_together_equal_each_alone(two_concepts, two_concepts_result):
    together, history_together, _ = two_concepts_result
    for c in range(2):
        alone = random_stage1_setup(
            **SMALL, num_concepts=2, batch_size=8, use_pairwise=True, use_hinge=True,
            weights={"lambda_pairwise": 0.01, "lambda_hinge": 0.1, "hinge_margin": 0.9},
            rescale_start=2, rescale_end=3,
        )
        alone.state, alone.data, alone.hypers = (
            _concept(alone.state, c), _concept(alone.data, c), _concept(alone.hypers, c)
        )
        state, history = _run(alone, _one_device(alone), 4)
        np.testing.assert_allclose(state.embeds[0], together.embeds[c], rtol=RTOL, atol=ATOL)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("diffusion", "emb", "attn", "pairwise", "hinge"):
                np.testing.assert_allclose(
                    h_alone[name][0], h_together[name][c], rtol=1e-4, atol=1e-7, err_msg=name
                )
    # Every regularizer was live, so the test could see a mix-up between concepts.
    last = history_together[-1]
    assert all(np.all(last[name] > 0) for name in ("emb", "attn", "pairwise", "hinge"))
    assert not np.allclose(together.embeds[0], together.embeds[1])


def test_rescale_window_holds_the_norm(two_concepts_result):
    state, history, _ = two_concepts_result
    norms = [h["embed_norm"] for h in history]  # after steps 1..4
    np.testing.assert_allclose(norms[2], norms[1], rtol=1e-6)  # step 3 held at step 2's norm
    assert not np.allclose(norms[3], norms[2], rtol=1e-6)  # step 4 is free again
    np.testing.assert_allclose(state.ref_norm.mean(-1), norms[1], rtol=1e-6)


def test_one_compiled_program_per_configuration(two_concepts, two_concepts_result):
    _, _, step_fn = two_concepts_result
    assert step_fn.jitted._cache_size() == 1  # four calls, one trace and compile
    assert step_fn.jitted.lower(*two_concepts.args()).cost_analysis()["flops"] > 0


@pytest.mark.parametrize(
    "wrapper, concept_shards",
    [("mesh", 1), ("mesh", 2), ("pmap", 1)],
    ids=["mesh-data8", "mesh-concept2xdata4", "pmap-data8"],
)
def test_sharded_step_equals_one_device(two_concepts, two_concepts_result, wrapper, concept_shards):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    expected, history_expected, _ = two_concepts_result
    if wrapper == "mesh":
        mesh = train_step.make_mesh(concept_shards, jax.devices()[:8])
        step_fn = train_step.shard_stage1_step(mesh, **two_concepts.step_kwargs())
    else:
        step_fn = train_step.pmap_stage1_step(jax.devices()[:8], **two_concepts.step_kwargs())
    state, history = _run(two_concepts, step_fn, 4)
    np.testing.assert_allclose(state.embeds, expected.embeds, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(history[-1]["loss"], history_expected[-1]["loss"], rtol=1e-5)


def test_zero_weight_terms_leave_the_graph():
    flops = {}
    for name, terms in {
        "ti": dict(use_emb=False, use_attn=False), "core": dict(use_emb=True, use_attn=True),
    }.items():
        setup = random_stage1_setup(**SMALL, batch_size=2, **terms)
        step_fn = _one_device(setup)
        flops[name] = step_fn.jitted.lower(*setup.args()).cost_analysis()["flops"]
    # CoRe adds a y* U-Net pass with backward and a forward-only y_cat pass.
    assert 2.0 < flops["core"] / flops["ti"] < 3.5


def test_nonfinite_loss_skips_the_update_and_counts():
    setup = random_stage1_setup(**SMALL, batch_size=2, use_emb=False, use_attn=False)
    setup.data = setup.data.replace(latent_mean=setup.data.latent_mean.at[:].set(jnp.nan))
    before = jax.device_get(setup.state)
    state, history = _run(setup, _one_device(setup), 2)
    np.testing.assert_array_equal(state.embeds, before.embeds)
    np.testing.assert_array_equal(state.step, before.step + 2)  # fresh draws each step
    assert [int(h["nonfinite"][0]) for h in history] == [1, 1]
    assert int(state.nonfinite_streak[0]) == 2

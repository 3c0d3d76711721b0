"""The step: concepts are independent, sharding changes nothing, one program per config, a run's
zero weight takes its term out of its update exactly, non-finite steps are skipped.

Tiny random-weight models with one resnet per block (10 cross-attention layers) keep compile
times down; every code path of the step is still there.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import packing
import pytest

from core_jax import methods
from core_jax.train.parallel import make_mesh
from core_jax.train.step import shard_step
from core_jax.train.synthetic import random_setup

SMALL = dict(preset="tiny", unet_overrides={"layers_per_block": 1})
# Rows batched with other rows go through differently blocked matmuls/convs (XLA picks the
# blocking by batch size), so a concept trained in a pack differs from it alone by fp32
# reassociation: a few ulp per op, grown over 4 Adam steps to ~1e-6 relative on the vectors.
# 2e-5 leaves ~10x margin; a concept mix-up or a missing term changes them by >1e-3.
RTOL, ATOL = 2e-5, 1e-6
# Loss values are reductions over the batch: a few ulp of fp32 relative (rtol 1e-4 is ~1000
# ulp). Terms of the form 1 - cos start at 0 (S* starts at the super-category's embedding), where
# the cancellation leaves an absolute error of a few ulp of 1 (~1e-7): their floor is 1e-6.
# L_attn is a squared difference of attention means, ~1e-8 here: its floor sits far below it.
TERM_FLOORS = {"diffusion": 0.0, "emb": 1e-6, "pairwise": 1e-6, "hinge": 1e-6, "attn": 1e-12}
TWO = dict(SMALL, num_concepts=2, batch_size=8, lambda_pairwise=0.01, lambda_hinge=0.1,
           hinge_margin=0.9, rescale_start=2, rescale_end=3)


@pytest.fixture(scope="module")
def two_concepts():
    return random_setup(**TWO)


@pytest.fixture(scope="module")
def two_concepts_result(two_concepts):
    frozen_before = jax.device_get(two_concepts.frozen)
    step_fn = packing.one_device_step(two_concepts)
    state, history = packing.run_steps(two_concepts, step_fn, 4)
    # The frozen weights are arguments and stay bitwise what they were.
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(two_concepts.frozen))
    return state, history, step_fn


def test_concepts_trained_together_equal_each_alone(two_concepts_result):
    together, history_together, _ = two_concepts_result
    for c in range(2):
        alone = packing.alone(random_setup(**TWO), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 4)
        np.testing.assert_allclose(state.params["embeds"][0], together.params["embeds"][c],
                                   rtol=RTOL, atol=ATOL)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name, floor in TERM_FLOORS.items():
                np.testing.assert_allclose(
                    h_alone[name][0], h_together[name][c], rtol=1e-4, atol=floor, err_msg=name
                )
    # Every regularizer was live, so the test could see a mix-up between concepts.
    last = history_together[-1]
    assert all(np.all(last[name] > 0) for name in ("emb", "attn", "pairwise", "hinge"))
    assert not np.allclose(together.params["embeds"][0], together.params["embeds"][1])


def test_rescale_window_holds_the_norm(two_concepts_result):
    state, history, _ = two_concepts_result
    norms = [h["embed_norm"] for h in history]  # after steps 1..4
    # The hold rescales v to a stored norm: one division and one multiply, ~2 ulp.
    np.testing.assert_allclose(norms[2], norms[1], rtol=1e-6)  # step 3 held at step 2's norm
    assert not np.allclose(norms[3], norms[2], rtol=1e-6)  # step 4 is free again
    np.testing.assert_allclose(state.carry["norm_hold"].mean(-1), norms[1], rtol=1e-6)


def test_one_compiled_program_per_configuration(two_concepts, two_concepts_result):
    _, _, step_fn = two_concepts_result
    assert step_fn.jitted._cache_size() == 1  # four calls, one trace and compile
    assert step_fn.jitted.lower(*two_concepts.args()).cost_analysis()["flops"] > 0


@pytest.mark.parametrize("concept_shards", [1, 2], ids=["data8", "concept2xdata4"])
def test_sharded_step_equals_one_device(two_concepts, two_concepts_result, concept_shards):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    expected, history_expected, _ = two_concepts_result
    step_fn = shard_step(make_mesh(concept_shards, jax.devices()[:8]), two_concepts.program)
    state, history = packing.run_steps(two_concepts, step_fn, 4)
    np.testing.assert_allclose(state.params["embeds"], expected.params["embeds"],
                               rtol=RTOL, atol=ATOL)
    # pmean over 8 shards sums in another order: a few ulp of the mean.
    np.testing.assert_allclose(history[-1]["loss"], history_expected[-1]["loss"], rtol=1e-5)


def test_zero_weight_terms_leave_the_graph():
    flops = {}
    for name, weights in {"ti": dict(lambda_emb=0.0, lambda_attn=0.0), "core": {}}.items():
        setup = random_setup(**SMALL, batch_size=2, **weights)
        step_fn = packing.one_device_step(setup)
        flops[name] = step_fn.jitted.lower(*setup.args()).cost_analysis()["flops"]
    # CoRe adds a y* U-Net pass with backward and a forward-only y_cat pass.
    assert 2.0 < flops["core"] / flops["ti"] < 3.5


def test_zero_weight_run_in_a_group_equals_it_alone():
    """Run 0 weights every regularizer 0 in a pack where run 1 uses them all: run 0 must train
    as the same run does alone, where its program has no regularizer at all."""
    off = dict(lambda_emb=0.0, lambda_attn=0.0, lambda_pairwise=0.0, lambda_hinge=0.0)
    on = dict(lambda_emb=0.1, lambda_attn=0.5, lambda_pairwise=0.1, lambda_hinge=0.5,
              hinge_margin=0.99)
    packed = random_setup(**SMALL, num_concepts=2, batch_size=2, per_run=[off, on])
    assert {t.name for t in packed.program.terms} >= {"emb", "attn", "pairwise", "hinge"}
    together, _ = packing.run_steps(packed, packing.one_device_step(packed), 3)
    alone = packing.alone(random_setup(**SMALL, num_concepts=2, batch_size=2, **off), 0)
    assert [t.name for t in alone.program.terms] == ["diffusion"]
    state, _ = packing.run_steps(alone, packing.one_device_step(alone), 3)
    np.testing.assert_allclose(state.params["embeds"][0], together.params["embeds"][0],
                               rtol=RTOL, atol=ATOL)


def _nan_method() -> methods.Method:
    """A term that is NaN for every run: a run weighting it 0 must still update."""

    def nan_term(settings):
        return (methods.Term("nan", ("obj_aligned",),
                             lambda obj, numbers: jnp.sqrt(-1.0 - jnp.sum(obj ** 2)),
                             weight="lambda_nan"),)

    return methods.Method("nan_term", "a NaN for tests", {"lambda_nan": 0.0},
                          numbers=("lambda_nan",), needs_trained=("embeds",), terms=nan_term)


def test_nan_in_a_zero_weighted_term_does_not_skip_the_update():
    methods.register(_nan_method())
    try:
        packed = random_setup(
            **SMALL, num_concepts=2, batch_size=2, methods=("textual_inversion", "nan_term"),
            per_run=[{"lambda_nan": 0.0}, {"lambda_nan": 1.0}],
        )
    finally:
        del methods.METHODS["nan_term"]
    before = jax.device_get(packed.state)
    state, history = packing.run_steps(packed, packing.one_device_step(packed), 2)
    assert np.isnan(history[-1]["nan"]).all()  # the term is NaN for both runs
    assert [int(h["nonfinite"][0]) for h in history] == [0, 0]  # run 0 is not held back...
    assert [int(h["nonfinite"][1]) for h in history] == [1, 1]  # ...run 1 is
    np.testing.assert_array_equal(state.params["embeds"][1], before.params["embeds"][1])
    ti = packing.alone(random_setup(**SMALL, num_concepts=2, batch_size=2,
                             methods=("textual_inversion",)), 0)
    alone, _ = packing.run_steps(ti, packing.one_device_step(ti), 2)
    np.testing.assert_allclose(state.params["embeds"][0], alone.params["embeds"][0],
                               rtol=RTOL, atol=ATOL)


def test_nonfinite_loss_skips_the_update_and_counts():
    setup = random_setup(**SMALL, batch_size=2, lambda_emb=0.0, lambda_attn=0.0)
    setup.data = setup.data.replace(latent_mean=setup.data.latent_mean.at[:].set(jnp.nan))
    before = jax.device_get(setup.state)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    np.testing.assert_array_equal(state.params["embeds"], before.params["embeds"])
    np.testing.assert_array_equal(state.step, before.step + 2)  # fresh draws each step
    assert [int(h["nonfinite"][0]) for h in history] == [1, 1]
    assert int(state.nonfinite_streak[0]) == 2


def test_thesis_pairwise_reads_the_concept_and_trains():
    """pairwise_variant "thesis" puts S* and the super-category word into the matrices: a
    two-vector S* against its super-category gives another value than the context
    form on the same step, and both move the vectors."""
    values, moved = {}, {}
    for variant in ("context", "thesis"):
        setup = random_setup(**SMALL, num_vectors=2, batch_size=2, lambda_emb=0.0,
                             lambda_attn=0.0, lambda_pairwise=1.0, pairwise_variant=variant,
                             rescale_end=0)
        assert ("obj_concept" in setup.program.needs) == (variant == "thesis")
        before = np.asarray(setup.state.params["embeds"])
        state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
        values[variant] = float(history[-1]["pairwise"][0])
        moved[variant] = float(np.abs(state.params["embeds"] - before).max())
    assert np.isfinite(list(values.values())).all()
    assert values["thesis"] != pytest.approx(values["context"], rel=1e-3)
    assert min(moved.values()) > 0


@pytest.mark.parametrize("preset", ["micro", "tiny_sdxl"])
def test_setup_passes_the_text_weights_as_arguments_not_as_constants(preset):
    """CoRe's targets are encoded before training: with the weights closed over, jit embeds them
    in the program as constants (3 GB at SDXL's size, which XLA then constant-folds)."""
    limit = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", 100_000)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*constants were captured")
            random_setup(preset)
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", limit)

"""A whole-U-Net state split over the data axis (FSDP-style, `shard_state`): each device holds
1/n of the U-Net and its AdamW moments, and the run equals the same run with the state whole.

Stage 2 (`unet_finetune`) on the tiny U-Net with one resnet per block, 8 CPU devices.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from core_jax.config import stage_config
from core_jax.errors import InputError
from core_jax.train.parallel import make_mesh
from core_jax.train.stages import check_stage
from core_jax.train.step import WHOLE, shard_step, split_axes, unsplit
from core_jax.train.synthetic import random_setup

STAGE2 = dict(preset="tiny", unet_overrides={"layers_per_block": 1}, methods=("unet_finetune",),
              batch_size=8, learning_rate=1e-3)
STEPS = 2

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _bytes_on(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


def _total_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
def test_split_state_holds_an_eighth_and_equals_the_whole():
    # Clipping on (and live): the global norm must add up the slices across devices.
    clip_norm = 1e-3
    setup = random_setup(**STAGE2, clip_norm=clip_norm)
    assert setup.program.shard_groups == ("unet",)
    mesh = make_mesh(1, jax.devices()[:8])  # 1 concept x 8 data

    split_fn = shard_step(mesh, setup.program)
    state = jax.tree.map(np.copy, setup.state)
    for _ in range(STEPS):
        state, metrics_split = split_fn(state, *setup.args()[1:])
    assert split_fn.jitted._cache_size() == 1  # the placed first state compiles what later use

    # Per device: an eighth of the U-Net's parameters and of each AdamW moment, plus the leaves
    # too small to split (norms, biases) held whole, three times (parameters, mu, nu).
    unet_state = (state.params["unet"], state.opt_state)
    whole = _total_bytes(unet_state)
    axes = split_axes({"unet": state.params["unet"]}, ("unet",), 8)
    small = 3 * sum(leaf.nbytes for leaf, axis in zip(
        jax.tree.leaves(state.params["unet"]), jax.tree.leaves(axes), strict=True)
        if axis == WHOLE) + _total_bytes(state.opt_state[0].count)
    assert small < 0.1 * whole  # 6.5 % on this tiny U-Net; far less at SD's widths
    for device in mesh.devices.flat:
        held = _bytes_on(unet_state, device)
        assert held <= whole / 8 + small, (held, whole, small)

    # The same run with every device holding the whole state.
    whole_program = dataclasses.replace(setup.program, shard_groups=())
    whole_fn = shard_step(mesh, whole_program)
    expected = jax.tree.map(np.copy, setup.state)
    for _ in range(STEPS):
        expected, metrics_whole = whole_fn(expected, *setup.args()[1:])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.params), jax.device_get(expected.params))
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics_split[name], metrics_whole[name], rtol=1e-5)
    assert np.all(np.asarray(metrics_whole["grad_norm"]) > clip_norm)  # clipping was live


def test_shard_state_off_and_bad_values():
    assert random_setup(**STAGE2, shard_state="off").program.shard_groups == ()
    stage = stage_config(("unet_finetune",), shard_state="sometimes")
    with pytest.raises(InputError, match="stage2.shard_state is 'sometimes'; choose one of auto"):
        check_stage("stage2", stage)


def test_unsplit_places_a_state_that_never_left_one_device():
    # A sweep resumed from its last checkpoint restores the state onto one device and runs no
    # step before exporting; the export's gather must still work.
    mesh = make_mesh(4)
    on_one = {"embeds": jax.device_put(np.ones((4, 1, 32), np.float32), jax.devices()[0]),
              "unet": jax.device_put(np.ones((4, 64), np.float32), jax.devices()[0])}
    whole = unsplit(on_one, mesh)
    for leaf in jax.tree.leaves(whole):
        assert leaf.sharding.device_set == set(jax.devices())
        np.testing.assert_array_equal(np.asarray(leaf), np.ones(leaf.shape))

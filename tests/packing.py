"""What the packing tests share: a pack's step on one device, a few steps of it, and one run
of a pack cut out to train alone (`core_jax.train.synthetic.random_setup` setups)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from core_jax.train.parallel import make_mesh
from core_jax.train.step import shard_step


def one_device_step(setup: Any) -> Any:
    return shard_step(make_mesh(1, jax.devices()[:1]), setup.program)


def run_steps(setup: Any, step_fn: Any, steps: int) -> tuple[Any, list[Any]]:
    """The state after `steps` steps (on the host) and each step's metrics."""
    state, history = jax.tree.map(jnp.copy, setup.state), []  # the step donates its state
    for _ in range(steps):
        state, metrics = step_fn(state, *setup.args()[1:])
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def alone(setup: Any, c: int) -> Any:
    """`setup` reduced to its run `c` (a pack of one)."""
    setup.state, setup.data, setup.numbers = jax.tree.map(
        lambda x: x[c : c + 1], (setup.state, setup.data, setup.numbers))
    return setup

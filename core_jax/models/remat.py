"""Rematerialization of Flax modules that holds on XLA:CPU too.

`nn.remat` (`jax.checkpoint`) saves a module's inputs and recomputes the rest in the backward
pass, keeping the recomputation apart from the forward pass with optimization barriers. XLA's
CPU compiler removes those barriers and then merges the recomputation back into the forward
pass (common-subexpression elimination): on CPU the step keeps every activation, and its
temporary memory even grew (measured: the bench-small CoRe step, and a 20-layer chain of
matmuls, 329 MB without remat, 405 MB with `jax.checkpoint`). On CPU, `remat` here runs the
backward pass of the recomputed module inside a `lax.cond` on a predicate XLA cannot fold
(always true): a branch is a computation of its own, so nothing is merged across it, and the
recomputation waits for the cotangent (the chain: 98 MB). The other branch returns zeros and
is never taken. Elsewhere it is `nn.remat`: GPU and TPU compilers keep the barriers, and a
conditional would cost a GPU a host round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import lift
from flax.linen.transforms import lift_transform


def remat(module: type[nn.Module], policy: Callable[..., bool] | None = None) -> type[nn.Module]:
    """`module` with its activations recomputed in the backward pass (those `policy`, a
    `jax.checkpoint_policies` entry, saves are kept). Same parameters and outputs; on CPU,
    positional float array arguments only."""
    if jax.default_backend() != "cpu":
        return nn.remat(module, policy=policy)
    return lift_transform(_lifted_checkpoint, module, policy=policy)


def _lifted_checkpoint(fn: Callable[..., Any], policy: Callable[..., bool] | None) -> Any:
    """`flax.core.lift.checkpoint`'s structure (every collection and rng stream goes in and
    comes out) with `checkpoint_in_branch` for `jax.checkpoint`."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):  # noqa: ANN001, ANN202
        def body(variable_groups, rng_groups, *args):  # noqa: ANN001, ANN202
            scope = scope_fn(variable_groups, rng_groups)
            out = fn(scope, *args)
            return out, repack_fn(scope)

        return checkpoint_in_branch(body, policy)(variable_groups, rng_groups, *args)

    return lift.pack(inner, (True,), (True,), (True,), name="remat")


def checkpoint_in_branch(
    fn: Callable[..., Any], policy: Callable[..., bool] | None = None
) -> Callable[..., Any]:
    """`jax.checkpoint(fn, policy=policy)` whose backward pass (the recomputation and its
    transpose) runs in a conditional branch XLA cannot merge with the forward pass."""
    checkpointed = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args: Any) -> Any:
        return fn(*args)

    def forward(*args: Any) -> tuple[Any, Any]:
        return jax.vjp(checkpointed, *args)  # the residuals: the inputs, what policy saves

    def backward(vjp_fn: Callable[..., Any], cotangent: Any) -> Any:
        def recompute(operands: tuple[Any, Any]) -> Any:
            return operands[0](operands[1])

        shapes = jax.eval_shape(recompute, (vjp_fn, cotangent))

        def never(operands: tuple[Any, Any]) -> Any:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        always = jax.lax.rng_uniform(0.0, 1.0, ()) < 2.0
        return jax.lax.cond(always, recompute, never, (vjp_fn, cotangent))

    run.defvjp(forward, backward)
    return run

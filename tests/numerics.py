"""Comparisons of floating-point trees that two programs computed in different orders."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_close_to_scale(got: Any, expected: Any, tol: float) -> None:
    """Each leaf of `got` within `tol` times the largest magnitude of the same leaf of
    `expected`.

    Element-wise relative tolerances fail on entries that cancel to near zero (a gradient entry
    of 0.03 in a leaf of scale 30 carries the rounding of the large terms it summed); the
    rounding of a reassociated fp32 sum is bounded by the magnitude of its terms, which the
    leaf's largest entry stands for.
    """
    def check(path, got_leaf, expected_leaf):
        scale = max(float(jnp.max(jnp.abs(expected_leaf))), 1e-30)
        error = float(jnp.max(jnp.abs(jnp.asarray(got_leaf, jnp.float32)
                                      - jnp.asarray(expected_leaf, jnp.float32))))
        assert np.isfinite(error) and error <= tol * scale, (
            f"{jax.tree_util.keystr(path)}: max difference {error:.3g} > {tol:g} x scale "
            f"{scale:.3g}")

    jax.tree_util.tree_map_with_path(check, got, expected)


def assert_within_one_adam_step(got: dict[str, Any], expected: dict[str, Any], lr: float) -> None:
    """Weights trained by Adam the same way but summed in another order (other devices, other
    row blocking): every weight within one step (lr), 99.9 % of them within 1e-5.

    Adam moves a weight by about lr a step whatever its gradient's size, so where a gradient
    nearly cancels, the summation order shows at the scale of lr, not of the weight. A wrong
    update (another run's data, a missed step) moves most weights by whole steps.
    """
    assert got.keys() == expected.keys()
    close = total = 0
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=lr, err_msg=key)
        close += int(np.isclose(got[key], value, rtol=1e-5, atol=1e-6).sum())
        total += np.size(value)
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ by more than 1e-5"

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

"""SVDiff (Han et al. 2023, arXiv 2303.11305): shift the singular values of the frozen U-Net's
weights, S* frozen.

Every weight matrix of the U-Net (each linear kernel, and each convolution kernel reshaped to a
matrix of its output channels against in_channels x kh x kw, as the paper and
mkshing/svdiff-pytorch do) is decomposed once, W = U diag(sigma) V^T; a run learns one vector
delta per matrix (the "spectral shift", init 0) and uses

    W_delta = U diag(ReLU(sigma + delta)) V^T.

Only delta trains and lives in the state (the group "svdiff", [C, k] per matrix, k = the
matrix's smaller side): 282 matrices and 0.22 M shifts (0.89 MB in fp32) for SD 1.5's shapes
(the issue's "about 1 MB"; svdiff-pytorch's file, norm scales and text encoder included, is
1.2 MB), 12k for the tiny preset, so many runs pack against one frozen U-Net.

Exact at delta = 0. A reconstruction U diag(sigma) V^T is not W to the bit (the SVD's rounding,
~1e-6 relative in fp32), so the U-Net is never rebuilt from its factors: each kernel is
W + U diag(ReLU(sigma + delta) - sigma) V^T, which is the formula above wherever
U diag(sigma) V^T = W, and W itself, bit for bit, at delta = 0 (ReLU(sigma) - sigma = 0 since
sigma >= 0, and W + 0 = W). Products run at fp32 precision (`HIGHEST`: no TF32 or bf16 passes
on accelerators), in the step and in `merge` alike, so the trained and the exported U-Net are one
function.

The factors are frozen and shared, never per run: `factors` computes them once per frozen U-Net
in this process (numpy's LAPACK SVD in fp32, on the host) and the step gets them as
`frozen["svdiff"]` (`ParamGroup.shared`), like the frozen models. They are not cached on disk:
they hold more numbers than the U-Net (U and V of every matrix: 1.08 G numbers, 4.3 GB in fp32,
for SD 1.5's 0.86 G), and the SVD (~6 TFLOP for SD 1.5, a minute or few on a many-core host) is
paid once per process, not per run or step. A run's device holds the factors beside the
U-Net, and each step builds each packed run's shifted kernels (a U-Net-sized temporary per run,
as a U-Net copy would be; only the shifts persist).

Which weights: the kernels of every linear and convolution layer of the U-Net (2-D and 4-D
kernels), the time embedding's and the attention projections included. Not shifted: biases and
the norm layers' 1-D scales (svdiff-pytorch also shifts those, at lr 1e-6), and the text encoder
(its `--train_text_encoder` option): neither is built here.

Keys (stage config): the stage's `learning_rate` is delta's. 1e-3 is the learning rate of the
paper and of mkshing/svdiff-pytorch's README (`--learning_rate=1e-3`, 500 steps, batch 1; "the
learning rate for SVDiff needs to be 1000 times larger than the lr used for fine-tuning"),
METHODS.md section 5; `configs/svdiff_tiny.py` uses it.

Exports (`core_jax.export.save_svdiff`): delta as `spectral_shifts.safetensors`, one float32
vector [k] per matrix named `<diffusers module>.delta` (svdiff-pytorch's parameter names), and
the merged U-Net as a diffusers `unet/` folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from core_jax.methods.base import Method, ParamGroup, Settings, UNetCall
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_only
from core_jax.weights import path_to_torch_key

LEARNING_RATE = 1e-3  # arXiv 2303.11305; mkshing/svdiff-pytorch README


def matrix_paths(unet_params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The module paths of the U-Net's weight matrices: every 2-D (linear) and 4-D (conv)
    kernel, in path order."""
    return sorted(path[:-1] for path, leaf in traverse_util.flatten_dict(unet_params).items()
                  if path[-1] == "kernel" and np.ndim(leaf) in (2, 4))


def as_matrix(kernel: Any) -> Any:
    """A Flax kernel as the matrix whose singular values shift: a linear kernel [in, out] as is,
    a conv kernel [kh, kw, in, out] as [kh kw in, out]. That is the transpose of torch's
    [out, in kh kw] with its columns permuted: the same singular values, in the same order."""
    return kernel.reshape(-1, kernel.shape[-1])


def _svd(kernel: Any) -> dict[str, np.ndarray]:
    matrix = np.asarray(as_matrix(np.asarray(kernel)), np.float32)
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return {"U": u, "s": s, "Vh": vh}  # [rows, k], [k] descending, [k, cols]


_CACHE: list[tuple[list[Any], Any]] = []  # (the kernels, their factors): the last U-Net's only


def factors(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen U-Net's SVD factors, mirroring its params down to each weight matrix:
    {"U": [rows, k], "s": [k], "Vh": [k, cols]} (device arrays, fp32). Computed once per
    U-Net in this process: a second call with the same kernel arrays (by identity) returns the
    first result, so the runs, packs and sample grids of a job share one computation."""
    flat = traverse_util.flatten_dict(unet_params)
    paths = matrix_paths(unet_params)
    kernels = [flat[path + ("kernel",)] for path in paths]
    for source, value in _CACHE:
        same = len(source) == len(kernels)
        if same and all(a is b for a, b in zip(source, kernels, strict=True)):
            return value
    value = traverse_util.unflatten_dict(
        {path: jax.tree.map(jnp.asarray, _svd(k)) for path, k in zip(paths, kernels, strict=True)})
    _CACHE[:] = [(kernels, value)]
    return value


def _modules(tree: Mapping[str, Any], leaf: str | None = None) -> dict[tuple[str, ...], Any]:
    flat = traverse_util.flatten_dict(tree)
    if leaf is None:  # factors: {"U", "s", "Vh"} per module
        paths = sorted({p[:-1] for p in flat})
        return {p: {k: flat[p + (k,)] for k in ("U", "s", "Vh")} for p in paths}
    return {p[:-1]: v for p, v in sorted(flat.items()) if p[-1] == leaf}


def init_deltas(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """One run's first shifts: zeros [k] per weight matrix (k = its smaller side), as a tree
    mirroring the U-Net's params down to each module, the vector under "delta"."""
    flat = traverse_util.flatten_dict(unet_params)

    def size(shape: tuple[int, ...]) -> int:
        return min(int(np.prod(shape[:-1])), shape[-1])

    return traverse_util.unflatten_dict({
        path + ("delta",): jnp.zeros((size(flat[path + ("kernel",)].shape),), jnp.float32)
        for path in matrix_paths(unet_params)
    })


def _init_group(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> dict[str, Any]:
    """The C packed runs' first shifts: zeros (nothing random)."""
    one = init_deltas(jax.eval_shape(lambda: frozen["unet"]))
    return jax.tree.map(lambda z: jnp.zeros((keys.shape[0],) + z.shape, z.dtype), one)


def shifted(kernel: jax.Array, factor: Mapping[str, jax.Array], delta: jax.Array) -> jax.Array:
    """W + U diag(ReLU(sigma + delta) - sigma) V^T, shaped and typed as `kernel` (see the
    module docstring: exactly `kernel` at delta = 0)."""
    d = jax.nn.relu(factor["s"] + delta) - factor["s"]
    change = jnp.matmul(factor["U"] * d, factor["Vh"], precision=jax.lax.Precision.HIGHEST)
    return (as_matrix(kernel) + change).reshape(kernel.shape).astype(kernel.dtype)


def merge(unet_params: Any, deltas: Mapping[str, Any], shared: Mapping[str, Any]) -> Any:
    """The U-Net params with every weight matrix's singular values shifted by `deltas` (one
    run's, no concept axis); `shared` the frozen U-Net's `factors`."""
    flat = traverse_util.flatten_dict(unet_params)
    by_module = _modules(shared)
    for path, delta in _modules(deltas, "delta").items():
        flat[path + ("kernel",)] = shifted(flat[path + ("kernel",)], by_module[path], delta)
    return traverse_util.unflatten_dict(flat)


def shifted_call(call: UNetCall, unet_params: Any, deltas: Any, shared: Any) -> Any:
    """`call` with the run's own U-Net: the frozen one with its spectra shifted."""
    return call(merge(unet_params, deltas, shared))


def state_dict(deltas: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One run's shifts by their diffusers module names: `<module>.delta` -> [k] float32."""
    return {path_to_torch_key((*path, "delta")): np.ascontiguousarray(np.asarray(v, np.float32))
            for path, v in _modules(deltas, "delta").items()}


def from_state_dict(state: Mapping[str, np.ndarray], unet_params: Any) -> dict[str, Any]:
    """Shifts read back by name (`state_dict`'s inverse) for `unet_params`' matrices; a name
    the U-Net lacks, or a vector of the wrong size, is an error."""
    want = {path_to_torch_key((*path, "delta")): path
            for path in matrix_paths(unet_params)}
    zeros = traverse_util.flatten_dict(init_deltas(unet_params))
    flat = {}
    for name, value in state.items():
        path = want.get(name)
        if path is None or zeros[path + ("delta",)].shape != np.shape(value):
            raise ValueError(f"spectral shift {name!r} {np.shape(value)} fits no weight matrix "
                             "of this U-Net")
        flat[path + ("delta",)] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict({**zeros, **flat})


SVDIFF = ParamGroup(init=_init_group, unet_call=shifted_call, merge=merge, shared=factors)

METHOD = Method(
    name="svdiff",
    summary="shift the singular values of every U-Net weight matrix, S* frozen (SVDiff)",
    defaults=DEFAULTS,
    source="arXiv 2303.11305; mkshing/svdiff-pytorch (lr 1e-3 for the shifts, 500 steps)",
    trains={"svdiff": "learning_rate"},
    groups={"svdiff": SVDIFF},
    terms=diffusion_only,
)

METHODS = (METHOD,)

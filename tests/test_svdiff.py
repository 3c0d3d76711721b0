"""SVDiff: the merged U-Net is the base model bit for bit at delta = 0 and numpy's
U diag(ReLU(sigma + delta)) V^T at random delta; the SVD is computed once; the exported shifts
carry diffusers' module names; packed runs equal the same runs alone; `core-jax train` with
configs/svdiff_tiny.py and a small sweep end to end.
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
from safetensors.numpy import load_file

from core_jax import weights
from core_jax.export import SVDIFF_NAME, save_svdiff
from core_jax.methods import svdiff
from core_jax.models.presets import random_models
from core_jax.train.passes import merged_unet, with_shared

ROOT = Path(__file__).resolve().parents[1]


def _unet(preset: str = "micro", seed: int = 0):
    models = random_models(preset, seed)
    return models.unet, models.params["unet"]


def _random_deltas(params, factors, seed: int):
    """Shifts delta_i = sigma_i z_i, z ~ N(0, 1): large, and ReLU clips where z < -1."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(svdiff.init_deltas(params))
    sigmas = traverse_util.flatten_dict(factors)
    return traverse_util.unflatten_dict({
        path: jnp.asarray(np.asarray(sigmas[path[:-1] + ("s",)]) * rng.standard_normal(v.shape),
                          jnp.float32)
        for path, v in flat.items()
    })


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


# --- The merged U-Net ------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_unet_at_zero_is_the_base_model_bitwise():
    """W + U diag(ReLU(sigma + 0) - sigma) V^T = W + 0: every leaf's bits, and so the U-Net's
    output, are the base model's (a reconstruction U diag(sigma) V^T would miss by ~1e-7)."""
    module, params = _unet("tiny")
    factors = svdiff.factors(params)
    zero = svdiff.init_deltas(params)
    merged = svdiff.merge(params, zero, factors)
    flat, base = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(params)
    assert flat.keys() == base.keys()
    for path, leaf in base.items():
        np.testing.assert_array_equal(_bits(flat[path]), _bits(leaf), err_msg=str(path))
    # What the other formula would give: not the base model.
    f = factors["mid_block"]["resnets_0"]["conv1"]
    kernel = params["mid_block"]["resnets_0"]["conv1"]["kernel"]
    rebuilt = (np.asarray(f["U"]) * np.asarray(f["s"])) @ np.asarray(f["Vh"])
    assert np.abs(rebuilt - np.asarray(svdiff.as_matrix(kernel))).max() > 0
    # Through the step's path (the group's unet_call, jitted) the output is the base's.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([500])
    ctx = jnp.asarray(rng.standard_normal((1, 7, module.config.cross_attention_dim)), jnp.float32)

    def apply(p):
        return module.apply({"params": p}, x, t, ctx)

    base_out = jax.jit(apply)(params)
    ours = jax.jit(lambda p, d, f: svdiff.shifted_call(apply, p, d, f))(params, zero, factors)
    np.testing.assert_array_equal(_bits(ours), _bits(base_out))


@pytest.mark.slow
def test_merged_unet_at_random_delta_is_numpys_reconstruction():
    """Each kernel against U diag(ReLU(sigma + delta)) V^T from numpy's float64 SVD of torch's
    layout [out, in kh kw] (the conv kernel transposed to torch's [out, in, kh, kw] and
    reshaped, as the paper's code does): the same singular values in the same order as our
    [kh kw in, out] matrix, so the same delta applies.

    Tolerance: ours is W + U diag(d) V^T in fp32 with fp32 factors. Its error is the fp32 SVD's
    (backward error ~ k eps |W|_2, k <= 576 here) plus the rounding of U, V and the k-term
    product scaled by |d| <= 2 sigma_max: a few times sqrt(k) eps32 sigma_max ~ 1e-5
    sigma_max; the bound is 2e-5 sigma_max per matrix (observed 1.7e-7 sigma_max). A shift
    applied to the wrong singular value, a missing ReLU or a transposed factor is off by
    ~0.1 sigma_max."""
    _, params = _unet("tiny")
    factors = svdiff.factors(params)
    deltas = _random_deltas(params, factors, seed=1)
    merged = traverse_util.flatten_dict(svdiff.merge(params, deltas, factors))
    flat_deltas = traverse_util.flatten_dict(deltas)
    clipped, worst = 0, 0.0
    for path in svdiff.matrix_paths(params):
        kernel = np.asarray(params_at(params, path)["kernel"], np.float64)
        delta = np.asarray(flat_deltas[path + ("delta",)], np.float64)
        torch_layout = kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)
        u, s, vh = np.linalg.svd(torch_layout.reshape(torch_layout.shape[0], -1),
                                 full_matrices=False)
        clipped += int(np.sum(s + delta < 0))
        want = (u * np.maximum(s + delta, 0)) @ vh  # [out, in kh kw]
        want = want.T if kernel.ndim == 2 else want.reshape(torch_layout.shape).transpose(
            2, 3, 1, 0)
        got = np.asarray(merged[path + ("kernel",)], np.float64)
        error = np.abs(got - want).max() / s[0]
        worst = max(worst, error)
        assert error < 2e-5, (path, error)
        assert np.abs(got - kernel).max() > 1e-2 * s[0]  # the shift matters
    assert clipped > 0  # ReLU's clipping was exercised
    print(f"worst error / sigma_max: {worst:.2e}")


def params_at(params, path):
    node = params
    for part in path:
        node = node[part]
    return node


@pytest.mark.slow
def test_the_svd_is_computed_once_and_shared(monkeypatch):
    """`with_shared` (the step's frozen weights) and `merged_unet` (sample grids, exports) of
    the same U-Net compute the SVD once; the factors are not in a run's params."""
    _, params = _unet("micro", seed=3)
    calls = []
    real = svdiff._svd
    monkeypatch.setattr(svdiff, "_svd", lambda k: calls.append(1) or real(k))
    frozen = with_shared({"text": {}, "unet": params}, ["svdiff", "embeds"])
    n = len(svdiff.matrix_paths(params))
    assert len(calls) == n and set(frozen) == {"text", "unet", "svdiff"}
    zero = svdiff.init_deltas(params)
    merged = merged_unet({"embeds": None, "svdiff": zero}, params)
    with_shared({"text": {}, "unet": params}, ["svdiff"])
    assert len(calls) == n  # no second SVD
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), merged, params)


# --- Export ----------------------------------------------------------------------------------

def test_exported_shifts_carry_diffusers_module_names(tmp_path):
    """The file names each shift `<module>.delta` for a module of diffusers' U-Net whose
    weight has out x (in kh kw) with k = the smaller side; it reads back to the same shifts."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from core_jax.models.presets import get_preset

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(get_preset("micro").unet.to_diffusers())
    ref.save_pretrained(tmp_path / "base" / "unet")
    _, params = weights.load_unet(tmp_path / "base")
    factors = svdiff.factors(params)
    deltas = _random_deltas(params, factors, seed=2)
    path = save_svdiff(tmp_path, deltas)
    assert path == tmp_path / SVDIFF_NAME
    state = load_file(path)
    modules = dict(ref.named_modules())
    matrices = {n for n, m in modules.items()
                if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    assert {k.removesuffix(".delta") for k in state} == matrices
    for name, value in state.items():
        weight = modules[name.removesuffix(".delta")].weight
        assert value.shape == (min(weight.shape[0], weight[0].numel()),), name
    back = svdiff.from_state_dict(state, params)
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(deltas))
    with pytest.raises(ValueError, match="fits no weight matrix"):
        svdiff.from_state_dict({"conv_in.delta": np.zeros(3, np.float32)}, params)


# --- Packed runs equal the same runs alone ---------------------------------------------------

@pytest.mark.slow
def test_packed_svdiff_runs_equal_each_alone():
    """Two runs with their own learning rates, packed (one program, each run's shifted U-Net
    built inside the vmapped call against one frozen U-Net and one set of factors) and each
    alone. Tolerances as tests/test_lora.py argues: losses and gradient norms to 1e-5
    relative; the shifts as one vector, relative L2 2e-4 (Adam divides each entry's gradient
    by its own size, so ulp-level differences of near-zero gradients grow to a fraction of an
    update). A mix-up of the runs (learning rates 3x apart) moves the shifts by ~1 relative."""
    from core_jax.train.synthetic import random_setup

    def setup():
        return random_setup(
            preset="tiny", unet_overrides={"layers_per_block": 1}, num_concepts=2,
            batch_size=2, methods=("svdiff",), weight_decay=1e-2,
            per_run=[{"learning_rate": 1e-3}, {"learning_rate": 3e-3}],
        )

    def vector(deltas, c: int) -> np.ndarray:
        return np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(deltas)])

    packed = setup()
    assert set(packed.state.params) == {"embeds", "svdiff"}  # no U-Net copy, no factors
    assert set(packed.frozen) == {"text", "unet", "svdiff"}  # the factors: shared, frozen
    frozen_before = jax.device_get(packed.frozen)
    step_fn = packing.one_device_step(packed)
    together, history_together = packing.run_steps(packed, step_fn, 3)
    assert step_fn.jitted._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(packed.frozen))
    np.testing.assert_array_equal(together.params["embeds"], packed.state.params["embeds"])
    # The shifts moved wherever the loss depends on them: everywhere but (as for LoRA) the mid
    # block's self-attention q and k, which see one token at its 1x1 resolution.
    moved = traverse_util.flatten_dict(together.params["svdiff"])
    still = {path[:-1] for path, x in moved.items() if np.abs(x).max() == 0}
    assert still <= {("mid_block", "attentions_0", "transformer_blocks_0", "attn1", proj)
                     for proj in ("to_q", "to_k")}, still
    assert len(still) < len(moved)
    for c in range(2):
        alone = packing.alone(setup(), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 3)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("loss", "grad_norm"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-5)
        want = vector(together.params["svdiff"], c)
        error = np.linalg.norm(vector(state.params["svdiff"], 0) - want) / np.linalg.norm(want)
        assert error < 2e-4, error
    first, second = (vector(together.params["svdiff"], c) for c in (0, 1))
    assert np.linalg.norm(first - second) > 0.1 * np.linalg.norm(first)


# --- End to end --------------------------------------------------------------------------------

MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=2", "--config.stage1.batch_size=2", "--config.stage1.rescale_start=1",
    "--config.stage1.rescale_end=2", "--config.stage2.steps=2", "--config.stage2.batch_size=2",
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {}',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


@pytest.mark.slow
def test_core_jax_train_with_svdiff_tiny_writes_the_shifts_and_the_merged_unet(tmp_path):
    """`core-jax train --config configs/svdiff_tiny.py` shrunk to the micro preset and 2 + 2
    steps: the shifts file holds the checkpoint's shifts, and unet/ is the base U-Net merged
    with them (bit for bit what `merge` gives), which moved from the base."""
    import orbax.checkpoint as ocp

    from core_jax.train import setup as run_setup
    from core_jax.train.outputs import export_run, load_run_config

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/svdiff_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "samples" / "stage2_step000004.png").is_file()
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options) as m:
        state = m.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "svdiff"}
    deltas = jax.tree.map(lambda x: np.asarray(x)[0], state["params"]["svdiff"])
    opt_leaves = jax.tree.leaves(state["opt_state"])
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(deltas)) + 1

    exported, want_state = load_file(workdir / SVDIFF_NAME), svdiff.state_dict(deltas)
    assert exported.keys() == want_state.keys()
    for key, value in want_state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert max(np.abs(v).max() for v in exported.values()) > 0  # stage 2 trained them

    base = run_setup.load_models(load_run_config(workdir)).params["unet"]
    _, folder = weights.load_unet(workdir / "unet")
    want = svdiff.merge(base, svdiff.from_state_dict(exported, base), svdiff.factors(base))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), folder, want)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(folder), jax.tree.leaves(base), strict=True)]
    assert max(moved) > 0
    # `core-jax export` from the checkpoint writes the same two things.
    written = export_run(workdir, tmp_path / "export")
    assert {tmp_path / "export" / SVDIFF_NAME, tmp_path / "export" / "unet"} <= set(written)
    again = load_file(tmp_path / "export" / SVDIFF_NAME)
    for key, value in exported.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    _, folder_again = weights.load_unet(tmp_path / "export")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), folder_again,
                 folder)


@pytest.mark.slow
def test_a_sweep_of_svdiff_runs_packs_and_each_equals_the_run_alone(tmp_path):
    """2 runs (two stage-2 learning rates) packed in one program per stage on one device; a run
    trained alone with its saved config gives the same shifts and the same merged U-Net.
    Tolerance as tests/test_lora.py's sweep test: Adam moves an entry by up to lr a step
    whatever its gradient's size, so packing's other summation order shows at the scale of lr
    on entries with tiny gradients: 0.1 lr absolute; a wrong update differs by whole steps."""
    import ml_collections

    from core_jax.config import base_config, stage_config
    from core_jax.train.loop import train
    from core_jax.train.sweep import sweep

    c = base_config()
    c.model.preset = "micro"
    c.data.resolution, c.data.num_views = 16, 4
    c.stage1.steps, c.stage1.batch_size = 2, 2
    c.stage1.rescale_start, c.stage1.rescale_end = 1, 2
    c.stage2 = stage_config(("svdiff",), steps=2, batch_size=2, learning_rate=1e-3)
    c.sample.at_end = False
    c.log_every = c.checkpoint_every = 2
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (
        dict(name="chelsea", images="builtin:chelsea", super_category="cat", templates="animate"),
    )
    c.sweep.grid = (("stage2.learning_rate", (1e-3, 3e-3)),)
    c.sweep.pack = 2
    c.sweep.concept_shards = 0
    summary = sweep(c, tmp_path / "sweep")
    assert summary["runs"] == 2 and len(summary["groups"]) == 1
    assert summary["groups"][0]["compilations"] == [1, 1]
    assert all(r["status"] == "done" for r in summary["results"])

    runs = sorted((tmp_path / "sweep" / "runs").iterdir())
    assert len(runs) == 2
    swept = [load_file(f / SVDIFF_NAME) for f in runs]
    assert any(np.abs(swept[0][k] - swept[1][k]).max() > 1e-3 for k in swept[0])
    folder = runs[-1]
    config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
    lr = config.stage2.learning_rate
    train(config, tmp_path / "alone")
    alone = load_file(tmp_path / "alone" / SVDIFF_NAME)
    assert alone.keys() == swept[-1].keys()
    for key, value in swept[-1].items():
        np.testing.assert_allclose(alone[key], value, rtol=1e-5, atol=0.1 * lr, err_msg=key)
    assert (tmp_path / "alone" / "unet" / "config.json").is_file()
    assert (folder / "unet" / "config.json").is_file()

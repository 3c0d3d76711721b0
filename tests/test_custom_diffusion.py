"""Custom Diffusion: our K/V-adapted U-Net against diffusers' `CustomDiffusionAttnProcessor`
(outputs, and the gradients the start-token detach shapes); our `.bin` through diffusers'
`load_attn_procs` into a tiny StableDiffusionPipeline; the zoom augmentation's views and masks;
the masked loss by hand; steps that move only the cross-attention K/V and S*; packed runs equal
to each alone; prior preservation in the same stage; `core-jax train` with
configs/custom_diffusion_tiny.py end to end.

Tolerance of the reference checks: max-abs 1e-4 on U-Net outputs of magnitude ~2 (fp32 on both
sides, only the summation order differs; tests/test_lora.py argues the size of that rounding;
observed 3e-6, and 2e-6 of the largest entry for the gradients).
The K/V are drawn 30 % away from the frozen ones, which moves the outputs by >= 1e-2: a wrong
layer mapping or a transposed kernel cannot hide under the bound.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import packing  # noqa: E402
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from torch_helpers import jitter, nchw, nhwc, tiny_pipeline  # noqa: E402

from core_jax import losses, weights  # noqa: E402
from core_jax.data import zoom_views  # noqa: E402
from core_jax.export import (  # noqa: E402
    CUSTOM_DIFFUSION_BIN_NAME,
    CUSTOM_DIFFUSION_NAME,
    export_concept,
)
from core_jax.methods.base import Settings  # noqa: E402
from core_jax.methods.custom_diffusion import (  # noqa: E402
    from_state_dict,
    init_kv,
    kv_call,
    kv_paths,
    merge,
    scaled_learning_rate,
    state_dict,
)
from core_jax.methods.diffusion_term import diffusion_term  # noqa: E402
from core_jax.train.passes import merged_unet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
SD1_UNET = dict(
    sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
    cross_attention_dim=24, norm_num_groups=16, layers_per_block=1,
)


def _trained_kv(unet_params, seed: int) -> dict:
    """K/V as after training: each frozen kernel moved by 30 % of its own spread."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda k: jnp.asarray(k + 0.3 * np.std(k) * rng.standard_normal(k.shape), jnp.float32),
        init_kv(unet_params))


def _inputs(sample_size: int, context_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, sample_size, sample_size, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, context_dim)).astype(np.float32)
    return latents, np.array([3, 871]), context


def _processors(unet, kv) -> dict:
    """diffusers' Custom Diffusion processors for every attention layer of `unet`: `kv`'s
    weights (by our file's names) on the cross-attention layers, plain ones elsewhere."""
    by_layer: dict[str, dict] = {}
    for name, value in state_dict(kv).items():
        layer, weight = name.split(".processor.")
        by_layer.setdefault(f"{layer}.processor", {})[weight] = torch.from_numpy(value)
    assert set(by_layer) == {n for n in unet.attn_processors if ".attn2." in n}
    processors = {}
    for name in unet.attn_processors:
        own = by_layer.get(name)
        if own is None:
            processors[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        hidden, cross = own["to_k_custom_diffusion.weight"].shape
        processors[name] = CustomDiffusionAttnProcessor(
            train_kv=True, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
        processors[name].load_state_dict(own)
    return processors


def _apply(module, latents, timesteps, context):
    return lambda params: module.apply({"params": params}, latents, timesteps, context)


def _theirs(unet, latents, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        return nhwc(unet(nchw(latents), torch.from_numpy(timesteps),
                         torch.from_numpy(context)).sample)


# --- Reference: diffusers' Custom Diffusion processors --------------------------------------

def _reference(tmp_path, seed: int):
    """A jittered diffusers U-Net, ours loaded from its folder, trained-like K/V, inputs."""
    torch.manual_seed(seed)
    ref = jitter(diffusers.UNet2DConditionModel(**SD1_UNET), seed=seed)
    ref.save_pretrained(tmp_path / "unet")
    module, params = weights.load_unet(tmp_path)
    assert len(kv_paths(params)) == 2 * module.config.num_cross_attention_layers == 20
    latents, timesteps, context = _inputs(8, 24, seed=seed)
    return ref, params, _trained_kv(params, seed), _apply(module, latents, timesteps, context), (
        latents, timesteps, context)


def test_kv_adapted_unet_matches_diffusers_processors(tmp_path):
    """Our U-Net call with trained K/V (through `kv_call`, and with the K/V merged into the
    kernels as the sampler uses them) against diffusers' U-Net with Custom Diffusion
    processors holding the same K/V."""
    ref, params, kv, call, inputs = _reference(tmp_path, seed=0)
    base = np.asarray(call(params))
    ref.set_attn_processor(_processors(ref, kv))
    expected = _theirs(ref, *inputs)
    assert np.abs(expected - base).max() > 1e-2 * np.abs(base).max()  # the K/V matter
    np.testing.assert_allclose(np.asarray(kv_call(call, params, kv)), expected, rtol=0,
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(call(merge(params, kv))), expected, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_kv_gradients_match_diffusers_processors_start_token_detached(tmp_path):
    """The gradient of a random projection of the output with respect to every K/V kernel:
    diffusers' processor detaches the start token's keys and values, so its gradients differ
    from a plain U-Net's with the same kernels; ours match it (bound: 1e-4 of the largest
    gradient entry; the gradient with the start token flowing is >= 1e-2 of it away: observed
    2e-6 and 0.58)."""
    ref, params, kv, call, (latents, timesteps, context) = _reference(tmp_path, seed=1)
    ref.set_attn_processor(_processors(ref, kv))
    out = ref(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    probe = np.random.default_rng(1).standard_normal(nhwc(out).shape).astype(np.float32)
    (out * nchw(probe)).sum().backward()
    their_grads = {
        f"{name}.{weight}.weight": getattr(processor, weight).weight.grad.numpy()
        for name, processor in ref.attn_processors.items() if processor.train_kv
        for weight in ("to_k_custom_diffusion", "to_v_custom_diffusion")
    }
    our_grads = state_dict(jax.grad(lambda v: jnp.sum(kv_call(call, params, v) * probe))(kv))
    flowing = state_dict(jax.grad(lambda v: jnp.sum(call(merge(params, v)) * probe))(kv))
    assert our_grads.keys() == their_grads.keys()
    scale = max(np.abs(g).max() for g in their_grads.values())
    for name, grad in their_grads.items():
        np.testing.assert_allclose(our_grads[name], grad, rtol=0, atol=1e-4 * scale,
                                   err_msg=name)
    assert max(np.abs(flowing[n] - g).max() for n, g in their_grads.items()) > 1e-2 * scale


def test_exported_bin_loads_through_load_attn_procs_and_adapts_like_ours(tmp_path):
    """`export_concept` into a folder; diffusers 0.42's `load_attn_procs` installs the
    processors only when given the pipeline (`_pipeline=pipe`) and only from the `.bin`, whose
    empty entries name the self-attention layers. The safetensors file holds the same numbers
    and reads back into the K/V bit for bit; the learned token loads with
    `load_textual_inversion` from the same folder."""
    pipe = tiny_pipeline(seed=3)
    pipe.unet.save_pretrained(tmp_path / "base" / "unet")
    module, params = weights.load_unet(tmp_path / "base")
    assert len(kv_paths(params)) == 32  # SD 1.x's 16 cross-attention layers, k and v
    kv = jax.device_get(_trained_kv(params, seed=3))
    latents, timesteps, context = _inputs(8, 32, seed=3)
    base = _theirs(pipe.unet, latents, timesteps, context)
    ours = np.asarray(kv_call(_apply(module, latents, timesteps, context), params, kv))
    assert np.abs(ours - base).max() > 1e-2 * np.abs(base).max()

    vectors = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
    folder = tmp_path / "run"
    written = export_concept(folder, name="chelsea", placeholder="<s*>", vectors=vectors,
                             custom_diffusion=kv)
    assert written["custom_diffusion"] == folder / CUSTOM_DIFFUSION_NAME
    assert written["custom_diffusion_bin"] == folder / CUSTOM_DIFFUSION_BIN_NAME

    pipe.unet.load_attn_procs(str(folder), weight_name=CUSTOM_DIFFUSION_BIN_NAME, _pipeline=pipe)
    trained = [p for n, p in pipe.unet.attn_processors.items() if ".attn2." in n]
    assert len(trained) == 16 and all(p.train_kv and not p.train_q_out for p in trained)
    np.testing.assert_allclose(_theirs(pipe.unet, latents, timesteps, context), ours, rtol=0,
                               atol=ATOL)

    tensors = load_file(folder / CUSTOM_DIFFUSION_NAME)
    pickled = torch.load(folder / CUSTOM_DIFFUSION_BIN_NAME, weights_only=True)
    assert {k for k, v in pickled.items() if not len(v)} == {
        n for n in pipe.unet.attn_processors if ".attn1." in n}
    assert {k for k, v in pickled.items() if len(v)} == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(pickled[key].numpy(), value, err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_state_dict(tensors, params)),
                 kv)
    with pytest.raises(ValueError, match="do not fit this U-Net: missing"):
        from_state_dict(dict(list(tensors.items())[1:]), params)

    pipe.load_textual_inversion(str(folder))
    token = pipe.tokenizer.convert_tokens_to_ids("<s*>")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[token], vectors[0])


# --- The zoom augmentation and the masked loss -----------------------------------------------

def test_zoom_views_place_the_photo_and_mask_its_region():
    """A white photo: zoomed-out views show it as a white square on a mid-grey (0) canvas, with
    the mask the latent cells it covers less one on each side; zoomed-in views are all photo
    with a full mask. About 2/3 of views are zoomed out; a seed gives the same arrays."""
    white = np.full((40, 30, 3), 255, np.uint8)
    resolution, factor = 64, 8
    views, masks = zoom_views([white], 60, resolution, factor, seed=0)
    assert views.shape == (60, 64, 64, 3) and masks.shape == (60, 8, 8, 1)
    assert views.dtype == np.float32 and masks.dtype == bool
    zoomed_out = 0
    for view, mask in zip(views, masks, strict=True):
        photo = np.all(view > 0.99, axis=-1)
        if mask.all():  # a zoomed-in crop
            assert photo.all()
            continue
        zoomed_out += 1
        assert np.all(view[~photo] == 0)
        rows, cols = np.nonzero(photo)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert bottom - top == right - left >= resolution // 3  # a square of side >= R/3
        want = np.zeros((8, 8), bool)
        want[top // factor + 1:bottom // factor - 1, left // factor + 1:right // factor - 1] = True
        np.testing.assert_array_equal(mask[..., 0], want)
    assert 30 <= zoomed_out <= 50  # p = 0.66 of 60
    again = zoom_views([white], 60, resolution, factor, seed=0)
    np.testing.assert_array_equal(again[0], views)
    np.testing.assert_array_equal(again[1], masks)


def test_zoom_views_flip_and_cycle_through_the_photos():
    left_dark = np.full((32, 32, 3), 255, np.uint8)
    left_dark[:, :16] = 0
    views, masks = zoom_views([left_dark, np.zeros((32, 32, 3), np.uint8)], 40, 32, 8, seed=1,
                              flip_p=1.0)
    assert np.all(views[1::2] <= 0)  # the black photo, every other view
    crops = [v for v, m in zip(views[0::2], masks[0::2], strict=True) if m.all()]  # zoomed in
    assert crops and all(v[:, -1].mean() < 0 < v[:, 0].mean() for v in crops)  # flipped


def test_masked_loss_equals_a_hand_computation():
    """Per row: the mean of the squared error over the masked latent elements (all channels
    of each masked cell), 0 for an empty mask; then the mean over rows. The official code's
    channel-summed error over the mask's cell count is 4x this (4 latent channels). An
    all-ones mask is the unmasked loss; the stage's term reads the mask as `loss_mask`."""
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 4, 6, 6, 4)).astype(np.float32)
    mask = rng.random((4, 6, 6, 1)) < 0.4
    mask[3] = False
    err = (pred.astype(np.float64) - target) ** 2
    per_row = [err[b][mask[b, ..., 0]].mean() if mask[b].any() else 0.0 for b in range(4)]
    got = losses.diffusion_loss(pred, target, mask=mask)
    chex.assert_trees_all_close(got, np.float32(np.mean(per_row)), rtol=1e-6)

    seen = mask[:3]  # the official code divides by zero on an empty mask
    theirs = np.mean((err[:3] * seen).sum(axis=(1, 2, 3)) / seen.sum(axis=(1, 2, 3)))
    ours = losses.diffusion_loss(pred[:3], target[:3], mask=seen)
    chex.assert_trees_all_close(theirs, 4 * np.float64(ours), rtol=1e-6)

    chex.assert_trees_all_close(
        losses.diffusion_loss(pred, target, mask=np.ones((4, 6, 6, 1), bool)),
        losses.diffusion_loss(pred, target), rtol=1e-6)

    term = diffusion_term(Settings({"min_snr_gamma": 0.0, "masked_loss": True}))
    assert term.inputs == ("caption_pred", "target", "loss_mask")
    chex.assert_trees_all_close(term.fn(pred, target, mask, {}), got)
    snr = rng.uniform(0.5, 10.0, 4).astype(np.float32)
    term = diffusion_term(Settings({"min_snr_gamma": 5.0, "masked_loss": True}))
    assert term.inputs == ("caption_pred", "target", "snr", "loss_mask")
    weighted = np.mean(np.minimum(1.0, 5.0 / snr) * np.asarray(per_row))
    chex.assert_trees_all_close(term.fn(pred, target, snr, mask, {}), np.float32(weighted),
                                rtol=1e-6)


def test_scaled_learning_rate_is_the_codes_scale_lr():
    # The diffusers recipe (2 images per GPU on 2 GPUs, prior preservation): 1e-5 x 4 x 2.
    assert scaled_learning_rate(4, prior_preservation=True) == pytest.approx(8e-5)
    assert scaled_learning_rate(1) == pytest.approx(1e-5)


def test_a_masked_stage_without_masked_views_is_one_line():
    from core_jax.config import base_config, stage_config
    from core_jax.errors import InputError
    from core_jax.train import setup as run_setup

    config = base_config()
    config.concept.super_category = "cat"
    config.stage1 = stage_config(("custom_diffusion",), steps=2)
    with pytest.raises(InputError, match=r"^stage1.masked_loss needs views with object masks"):
        run_setup.check_config(config)
    config.data.augmentation = "custom_diffusion"
    run_setup.check_config(config)
    config.data.augmentation = "zoom"
    with pytest.raises(InputError, match="data.augmentation is 'zoom'; choose one of core, "):
        run_setup.check_config(config)


# --- Steps: only K/V and S* move; packed runs equal each alone ------------------------------

def _setup(**stage):
    """Two runs of the tiny preset (one layer per block: 10 cross-attention layers) with their
    own learning rates, and random object masks over their views."""
    from core_jax.train.synthetic import random_setup

    setup = random_setup(
        preset="tiny", unet_overrides={"layers_per_block": 1}, num_concepts=2, batch_size=2,
        methods=stage.pop("methods", ("custom_diffusion",)), weight_decay=1e-2,
        per_run=[{"learning_rate": 1e-3}, {"learning_rate": 3e-3}], **stage,
    )
    shape = setup.data.latent_mean.shape[:-1] + (1,)
    masks = np.random.default_rng(0).random(shape) < 0.6
    setup.data = setup.data.replace(latent_mask=jnp.asarray(masks))
    return setup


@pytest.fixture(scope="module")
def packed():
    setup = _setup()
    before = jax.device_get((setup.frozen, setup.state.params))
    step_fn = packing.one_device_step(setup)
    state, history = packing.run_steps(setup, step_fn, 3)
    assert step_fn.jitted._cache_size() == 1
    return setup, before, state, history


def _vector(kv, c: int) -> np.ndarray:
    return np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(kv)])


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def test_steps_move_only_the_cross_attention_kv_and_the_token(packed):
    """After 3 steps: the state holds the vectors and the K/V only (Adam's moments of those
    only); the frozen models are bit for bit as before; each run's U-Net (frozen with its K/V
    in place) differs from the frozen one at exactly every cross-attention to_k and to_v
    kernel; S* moved."""
    setup, (frozen, params), state, _ = packed
    assert set(state.params) == {"embeds", "custom_diffusion"}
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * trained + 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), frozen,
                 jax.device_get(setup.frozen))
    paths = {path + ("kernel",) for path in kv_paths(frozen["unet"])}
    assert len(paths) == 20 and all(p[-3] == "attn2" for p in paths)
    base = traverse_util.flatten_dict(frozen["unet"])
    for c in range(2):
        assert np.abs(state.params["embeds"][c] - params["embeds"][c]).min() > 0
        run = jax.tree.map(lambda x, c=c: x[c], state.params)
        merged = traverse_util.flatten_dict(jax.device_get(merged_unet(run, frozen["unet"])))
        assert merged.keys() == base.keys()
        changed = {p for p in base if not np.array_equal(_bits(merged[p]), _bits(base[p]))}
        assert changed == paths
        for path in paths:
            assert np.all(merged[path] != base[path]), path  # every entry of every K/V


def test_packed_runs_equal_each_alone(packed):
    """Each run cut out of the pack and trained alone: losses and gradient norms to 1e-5
    relative, the K/V and S* as vectors to 2e-4 relative L2 (tests/test_lora.py argues both
    bounds: rows batched with other rows round differently, and Adam magnifies that on
    near-zero gradients). A mix-up of the runs (learning rates 3x apart) differs by ~1."""
    _, _, together, history_together = packed
    for c in range(2):
        alone = packing.alone(_setup(), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 3)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("loss", "diffusion", "grad_norm"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-5)
        for group in ("custom_diffusion", "embeds"):
            want = _vector(together.params[group], c) - _vector(alone.state.params[group], 0)
            got = _vector(state.params[group], 0) - _vector(alone.state.params[group], 0)
            assert np.linalg.norm(got - want) < 2e-4 * np.linalg.norm(want), group
    moved = [_vector(together.params["custom_diffusion"], c) - _vector(
        packed[1][1]["custom_diffusion"], c) for c in range(2)]
    assert np.linalg.norm(moved[0] - moved[1]) > 0.5 * np.linalg.norm(moved[0])


def test_prior_preservation_in_the_stage_is_unmasked_and_weighted():
    """Stage ("custom_diffusion", "prior_preservation"): the class rows ride in the same U-Net
    call, unmasked. With every view mask empty the diffusion term is 0 and the prior term
    alone trains the K/V; loss = diffusion + lambda_prior prior per run."""
    setup = _setup(methods=("custom_diffusion", "prior_preservation"), lambda_prior=0.25)
    rng = np.random.default_rng(1)
    data = setup.data
    pool = data.latent_mean.shape[:1] + (3,) + data.latent_mean.shape[2:]
    setup.data = data.replace(
        latent_mask=jnp.zeros_like(data.latent_mask),
        class_mean=jnp.asarray(rng.standard_normal(pool), jnp.float32),
        class_std=jnp.full(pool, 0.05, jnp.float32),
        class_hidden=jnp.asarray(rng.standard_normal((2, *data.cat_hidden.shape[2:])),
                                 jnp.float32),
    )
    before = jax.device_get(setup.state.params["custom_diffusion"])
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    for metrics in history:
        np.testing.assert_array_equal(metrics["diffusion"], 0.0)
        assert np.all(metrics["prior"] > 0) and np.all(np.isfinite(metrics["prior"]))
        np.testing.assert_allclose(metrics["loss"], 0.25 * metrics["prior"], rtol=1e-6)
    for c in range(2):
        assert np.abs(_vector(state.params["custom_diffusion"], c) - _vector(before, c)).max() > 0


# --- End to end --------------------------------------------------------------------------------

MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=2", "--config.stage1.batch_size=2",
    "--config.stage1.num_class_images=2", "--config.stage1.class_steps=2",
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {} {cls}',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


@pytest.mark.slow
def test_core_jax_train_with_custom_diffusion_tiny_exports_what_it_trained(tmp_path):
    """`core-jax train --config configs/custom_diffusion_tiny.py` shrunk to the micro preset
    and 2 steps, prior preservation on: both terms logged and finite, the class pool made, the
    checkpoint holds the vectors and K/V only, the exported files are the checkpoint's K/V
    (and `core-jax export` writes them again from the checkpoint)."""
    import orbax.checkpoint as ocp

    from core_jax.train.outputs import export_run

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/custom_diffusion_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("step") == 2][-1]
    assert np.isfinite(last["diffusion"]) and last["prior"] > 0 and np.isfinite(last["prior"])
    assert list((workdir / "class_pools").glob("*.npz"))
    assert (workdir / "samples" / "stage1_step000002.png").is_file()
    assert not (workdir / "unet").exists()

    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options) as m:
        state = m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "custom_diffusion"}
    kv = jax.tree.map(lambda x: np.asarray(x)[0], state["params"]["custom_diffusion"])
    exported = load_file(workdir / CUSTOM_DIFFUSION_NAME)
    want = state_dict(kv)
    assert exported.keys() == want.keys() and len(want) == 8  # micro: 4 cross-attention layers
    for key, value in want.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert (workdir / CUSTOM_DIFFUSION_BIN_NAME).is_file()
    assert (workdir / "learned_embeds.safetensors").is_file()

    written = export_run(workdir, tmp_path / "export")
    assert tmp_path / "export" / CUSTOM_DIFFUSION_NAME in written
    again = load_file(tmp_path / "export" / CUSTOM_DIFFUSION_NAME)
    for key, value in exported.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)




@pytest.mark.slow
def test_a_custom_diffusion_sweep_packs_and_each_run_equals_it_alone(tmp_path):
    """`core-jax sweep` of custom_diffusion_tiny.py (micro, 2 steps) over lambda_prior 0 and
    0.25, packed 2 at a time: one group, one compilation, one class pool; each run trained
    alone from its saved config ends at the same K/V. Tolerance as tests/test_sweep.py argues
    (another summation order; Adam moves an entry by up to lr a step)."""
    import ml_collections

    from core_jax.train.loop import train
    from core_jax.train.sweep import sweep

    spec = importlib.util.spec_from_file_location("cd_tiny",
                                                  ROOT / "configs/custom_diffusion_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()  # shrunk as MICRO shrinks it
    c.model.preset, c.data.resolution, c.data.num_views = "micro", 16, 4
    c.stage1.steps, c.stage1.batch_size = 2, 2
    c.stage1.num_class_images, c.stage1.class_steps = 2, 2
    c.sample.steps, c.sample.images_per_prompt = 2, 1
    c.log_every = c.checkpoint_every = 2
    c.stage1.class_pool_dir = str(tmp_path / "pools")
    c.sample.at_end = False
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (dict(name="chelsea", images="builtin:chelsea", super_category="cat",
                             templates="animate"),)
    c.sweep.grid = (("stage1.lambda_prior", (0.0, 0.25)),)
    c.sweep.pack = 2
    c.sweep.concept_shards = 0
    summary = sweep(c, tmp_path / "sweep")
    assert summary["runs"] == 2 and summary["groups"][0]["compilations"] == [1]
    results = {r["run"]: r for r in summary["results"]}
    assert all(r["status"] == "done" for r in results.values())
    lr = c.stage1.learning_rate
    for name in results:
        folder = tmp_path / "sweep" / "runs" / name
        config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
        train(config, tmp_path / "alone" / name)
        swept = load_file(folder / CUSTOM_DIFFUSION_NAME)
        alone = load_file(tmp_path / "alone" / name / CUSTOM_DIFFUSION_NAME)
        assert swept.keys() == alone.keys() and swept
        for key, value in swept.items():
            np.testing.assert_allclose(alone[key], value, rtol=0, atol=lr, err_msg=f"{name} {key}")


def test_sd15_config_holds_the_papers_recipe():
    """configs/custom_diffusion_sd15.py: METHODS.md section 5's numbers, lambda_prior at our
    loss scale (the code's 1.0 / 4), and a config the run's checks accept."""
    import importlib.util

    from core_jax.train import setup as run_setup

    spec = importlib.util.spec_from_file_location(
        "custom_diffusion_sd15", ROOT / "configs" / "custom_diffusion_sd15.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    s = c.stage1
    assert s.methods == ("custom_diffusion", "prior_preservation") and c.stage2.steps == 0
    assert (s.steps, s.batch_size, s.weight_decay) == (250, 4, 1e-2)
    assert s.learning_rate == pytest.approx(8e-5)
    assert (s.lambda_prior, s.num_class_images, s.masked_loss) == (0.25, 200, True)
    assert (c.data.augmentation, c.data.flip_p, c.data.resolution) == ("custom_diffusion", 0.5,
                                                                       512)
    assert c.concept.caption == "photo of a {} {cls}"
    c.concept.super_category = "dog"
    run_setup.check_config(c)

"""LoRA: our adapted U-Net against peft's, our file through diffusers' `load_lora_weights`, a
run with a LoRA stage 2 end to end, and packed LoRA runs equal to the same runs alone.

Tolerance of the reference checks: 5e-5 of the output's largest magnitude, the bound of
tests/test_models.py (fp32 on both sides, only the summation order differs; the U-Net's
convolutions, K = 576-term sums, ~40 in series, bound the error at ~1e-5 relative). The
adapters add, per adapted layer, an [in]-term and an [r]-term sum (in <= 64 here, r = 4) next
to the layer's own in-term sum: the same size of rounding as the layer itself, so the bound
holds. A wrong module mapping, a transposed A or B, or a wrong scale moves outputs by >= 1e-2
(the adapters are drawn large enough that every one of them matters at that level).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import packing  # noqa: E402
from torch_helpers import jitter, nchw, nhwc, tiny_pipeline  # noqa: E402

from core_jax import weights  # noqa: E402
from core_jax.errors import InputError  # noqa: E402
from core_jax.export import LORA_NAME, export_concept  # noqa: E402
from core_jax.methods.lora import (  # noqa: E402
    ATTENTION,
    FEED_FORWARD,
    LoraAdapters,
    adapted_call,
    init_adapters,
    merge,
    module_name,
    target_paths,
)
from core_jax.models.presets import get_preset  # noqa: E402

REL_TOL = 5e-5
SD1_UNET = dict(
    sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
    cross_attention_dim=24, norm_num_groups=16, layers_per_block=1,
)


def _assert_close(got, want, rel_tol: float = REL_TOL) -> None:
    """|got - want| <= rel_tol * max|want| elementwise (see the module docstring)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel_tol * np.abs(want).max())


def _trained_adapters(unet_params, rank: int, alpha: float, targets, seed: int) -> LoraAdapters:
    """Adapters as after training: A from the init, B random (at init B = 0 and the adapters
    would change nothing), sized so each adapter moves its layer's output by ~10%."""
    adapters = init_adapters(unet_params, rank, alpha, targets, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapters.layers)
    for path in [p for p in flat if p[-1] == "B"]:
        flat[path] = jnp.asarray(0.3 * rng.standard_normal(flat[path].shape), jnp.float32)
    return LoraAdapters(traverse_util.unflatten_dict(flat), adapters.scale)


def _inputs(config: dict, seed: int):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    latents = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    return latents, np.array([3, 871]), context


def _ours(module, params, adapters, latents, timesteps, context) -> np.ndarray:
    return np.asarray(adapted_call(
        lambda p: module.apply({"params": p}, latents, timesteps, context), params, adapters
    ))


def _theirs(unet, latents, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        return nhwc(unet(nchw(latents), torch.from_numpy(timesteps),
                         torch.from_numpy(context)).sample)


# --- Targets and init ------------------------------------------------------------------------

def test_targets_init_and_a_typo_is_one_line(tmp_path):
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**SD1_UNET).save_pretrained(tmp_path / "unet")
    module, params = weights.load_unet(tmp_path)
    names = [module_name(p) for p in target_paths(params, ATTENTION)]
    # Every transformer block (one per cross-attention layer: 3 down, 1 mid, 6 up here), both
    # of its attention layers, four projections each.
    blocks = {n.rsplit(".attn", 1)[0] for n in names}
    assert len(blocks) == module.config.num_cross_attention_layers == 10
    assert len(names) == len(blocks) * 2 * 4
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in names
    assert not any(".ff." in n for n in names)
    with_ff = [module_name(p) for p in target_paths(params, ATTENTION + FEED_FORWARD)]
    assert len(with_ff) == len(names) + 2 * len(blocks)
    with pytest.raises(InputError, match=r"lora_targets \['to_qq'\] name no linear layer"):
        target_paths(params, ("to_q", "to_qq"))

    adapters = init_adapters(params, 4, 8.0, ATTENTION, jax.random.key(0))
    assert adapters.scale == 2.0
    a = adapters.layers["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
    fan_in = params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"][
        "kernel"].shape[0]
    np.testing.assert_array_equal(a["B"], 0.0)  # training starts at the frozen model exactly
    assert np.abs(a["A"]).max() <= 1 / np.sqrt(fan_in) and np.abs(a["A"]).max() > 0.8 / np.sqrt(
        fan_in)  # peft's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))


# --- (a) Our adapted U-Net equals peft's -----------------------------------------------------

def test_adapted_unet_matches_peft_adapters_of_the_same_values(tmp_path):
    """r = 4, alpha = 8 (scale 2), attention and feed-forward targets."""
    torch.manual_seed(1)
    ref = jitter(diffusers.UNet2DConditionModel(**SD1_UNET), seed=1)
    ref.save_pretrained(tmp_path / "unet")
    module, params = weights.load_unet(tmp_path)
    targets = ATTENTION + FEED_FORWARD
    adapters = _trained_adapters(params, 4, 8.0, targets, seed=1)
    latents, timesteps, context = _inputs(SD1_UNET, seed=1)
    base = _theirs(ref, latents, timesteps, context)

    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                    lora_dropout=0.0))
    peft_layers = {n for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert peft_layers == {module_name(p) for p in adapters.modules()}  # the same modules
    with torch.no_grad():
        for path, layer in adapters.modules().items():
            wrapped = ref.get_submodule(module_name(path))
            wrapped.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(layer["A"]).T))
            wrapped.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(layer["B"]).T))
    expected = _theirs(ref, latents, timesteps, context)
    assert np.abs(expected - base).max() > 1e-2 * np.abs(base).max()  # the adapters matter

    ours = _ours(module, params, adapters, latents, timesteps, context)
    _assert_close(ours, expected)
    # Merged into the kernels (what the sampler uses): the same function. W + s A B rounds
    # once more per kernel entry (64-term products): within the same bound.
    merged = np.asarray(module.apply({"params": merge(params, adapters)}, latents, timesteps,
                                     context))
    _assert_close(merged, expected)


# --- (b) Our file through diffusers' load_lora_weights ---------------------------------------

def test_exported_lora_loads_in_diffusers_and_adapts_like_ours(tmp_path):
    """Both files `export_concept` writes: peft names (`pytorch_lora_weights.safetensors`,
    found by `load_lora_weights(folder)`) and kohya names (A1111/ComfyUI, which diffusers'
    loader converts), into a tiny StableDiffusionPipeline. r = 4, alpha = 2: a scale of 0.5
    that the peft file folds into B and the kohya file keeps as alpha."""
    pipe = tiny_pipeline(seed=2)
    pipe.unet.save_pretrained(tmp_path / "base" / "unet")
    module, params = weights.load_unet(tmp_path / "base")
    adapters = _trained_adapters(params, 4, 2.0, ATTENTION, seed=2)
    config = dataclasses.asdict(get_preset("tiny").unet)
    latents, timesteps, context = _inputs(config, seed=2)
    base = _theirs(pipe.unet, latents, timesteps, context)
    ours = _ours(module, params, adapters, latents, timesteps, context)
    assert np.abs(ours - base).max() > 1e-2 * np.abs(base).max()

    written = export_concept(tmp_path / "run", name="chelsea cat", placeholder="<s*>",
                             lora=jax.device_get(adapters))
    assert written["lora"] == tmp_path / "run" / LORA_NAME
    assert written["lora_kohya"] == tmp_path / "run" / "a1111" / "lora" / "chelsea_cat.safetensors"
    for kind, source in (("peft", tmp_path / "run"), ("kohya", written["lora_kohya"])):
        pipe.load_lora_weights(str(source), adapter_name=kind)
        _assert_close(_theirs(pipe.unet, latents, timesteps, context), ours)
        pipe.unload_lora_weights()
        np.testing.assert_array_equal(_theirs(pipe.unet, latents, timesteps, context), base)


# --- (d) Packed LoRA runs equal the same runs alone ------------------------------------------

def test_packed_lora_runs_equal_each_alone():
    """Two runs with their own learning rates, packed (one program, the U-Net call vmapped over
    runs against one frozen U-Net) and each alone (a plain call).

    As in tests/test_step.py, rows batched with other rows go through differently blocked
    matmuls: a few ulp per op. Losses and gradient norms, sums over the whole batch, agree to
    ~1e-7 relative (bound 1e-5). The adapters are compared as one vector (relative L2, bound
    2e-4, observed ~1e-5), not entry by entry: Adam divides each gradient entry by its own
    magnitude, so an entry whose gradient is a near-cancelling sum (|g| ~ Adam's eps 1e-8; the
    cross-attention queries, whose 77 keys are mostly the same padding token) turns those ulp
    into up to ~0.3% of its own small value. A mix-up between the runs (learning rates 3x
    apart) moves the adapters by ~1 relative."""
    from core_jax.train.synthetic import random_setup

    def setup():
        return random_setup(
            preset="tiny", unet_overrides={"layers_per_block": 1}, num_concepts=2,
            batch_size=2, methods=("lora",), weight_decay=1e-2,
            per_run=[{"learning_rate": 1e-3}, {"learning_rate": 3e-3}],
        )

    def vector(adapters: LoraAdapters, c: int) -> np.ndarray:
        return np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(adapters)])

    packed = setup()
    assert set(packed.state.params) == {"embeds", "lora"}  # no U-Net copy in the state
    frozen_before = jax.device_get(packed.frozen)
    step_fn = packing.one_device_step(packed)
    together, history_together = packing.run_steps(packed, step_fn, 3)
    assert step_fn.jitted._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(packed.frozen))
    np.testing.assert_array_equal(together.params["embeds"], packed.state.params["embeds"])
    # B moved from zero wherever the loss depends on it: everywhere but the mid block's
    # self-attention q and k, which see one token at its 1x1 resolution (softmax over one key).
    modules = together.params["lora"].modules()
    still = {path for path, layer in modules.items() if np.abs(layer["B"]).max() == 0}
    assert still == {("mid_block", "attentions_0", "transformer_blocks_0", "attn1", proj)
                     for proj in ("to_q", "to_k")}
    for c in range(2):
        alone = packing.alone(setup(), c)
        state, history = packing.run_steps(alone, packing.one_device_step(alone), 3)
        for h_alone, h_together in zip(history, history_together, strict=True):
            for name in ("loss", "grad_norm"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-5)
        want = vector(together.params["lora"], c)
        error = np.linalg.norm(vector(state.params["lora"], 0) - want) / np.linalg.norm(want)
        assert error < 2e-4, error
    first, second = (vector(together.params["lora"], c) for c in (0, 1))
    assert np.linalg.norm(first - second) > 0.1 * np.linalg.norm(first)


# --- (c) A run with a LoRA stage 2, end to end -----------------------------------------------

@pytest.mark.slow
def test_a_run_with_a_lora_stage_2_trains_checkpoints_and_exports(tmp_path):
    """`core_jax.train.loop.train` with stage2 = ("lora",) on micro models: the checkpointed
    stage-2 state holds the vectors and the adapters only (and Adam's moments of the adapters
    only), the exports are the checkpoint's adapters, and the sample grid of stage 2 is drawn."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from core_jax.config import base_config, stage_config
    from core_jax.train.loop import train

    c = base_config()
    c.model.preset = "micro"
    c.concept.name, c.concept.images, c.concept.super_category = "chelsea", "builtin:chelsea", "cat"
    c.data.resolution, c.data.num_views = 16, 4
    c.stage1.steps, c.stage1.batch_size = 2, 2
    c.stage1.rescale_start, c.stage1.rescale_end = 1, 2
    c.stage2 = stage_config(("lora",), steps=2, batch_size=2, learning_rate=1e-3, lora_rank=2,
                            lora_alpha=1.0)
    c.sample.steps, c.sample.prompts, c.sample.images_per_prompt = 2, ("a photo of a {}",), 1
    c.log_every = c.checkpoint_every = 1
    train(c, tmp_path)

    assert not (tmp_path / "unet").exists()
    assert (tmp_path / "samples" / "stage2_step000004.png").is_file()
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute(), options=options) as m:
        state = m.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"embeds", "lora"}
    layers = state["params"]["lora"]["layers"]
    opt_leaves = jax.tree.leaves(state["opt_state"])
    # Adam's two moments of the adapters and its step count [C = 1]: nothing of the U-Net.
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(layers)) + 1
    adapters = LoraAdapters(jax.tree.map(lambda x: np.asarray(x)[0], layers), scale=0.5)

    exported = load_file(tmp_path / LORA_NAME)
    assert len(exported) == 2 * len(adapters.modules()) > 0
    for path, layer in adapters.modules().items():
        key = f"unet.{module_name(path)}"
        np.testing.assert_array_equal(exported[f"{key}.lora_A.weight"], layer["A"].T)
        np.testing.assert_array_equal(exported[f"{key}.lora_B.weight"], (0.5 * layer["B"]).T)
    assert np.abs(exported[f"{key}.lora_B.weight"]).max() > 0  # stage 2 trained them
    kohya = load_file(tmp_path / "a1111" / "lora" / "chelsea.safetensors")
    assert len(kohya) == 3 * len(adapters.modules())
    assert all(kohya[k] == 1.0 for k in kohya if k.endswith(".alpha"))


# --- A sweep of 8 LoRA runs: one program per stage, each run as alone ------------------------

@pytest.mark.slow
def test_a_sweep_of_8_lora_runs_is_one_program_per_stage(tmp_path):
    """2 concepts x 4 stage-2 learning rates, packed 8 at a time on the 8 virtual CPU devices
    (conftest): one compiled program per stage; a run trained alone with its saved config
    gives the same adapters. Tolerance as tests/test_sweep.py argues: the sweep splits
    concepts and rows over devices (another summation order), and Adam moves an entry by up
    to lr a step whatever its gradient's size, so tiny gradients show the order at the scale
    of lr: 0.1 lr absolute; a wrong update differs by whole steps."""
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    import json

    import ml_collections
    from safetensors.numpy import load_file

    from core_jax.config import base_config, stage_config
    from core_jax.train.loop import train
    from core_jax.train.sweep import sweep

    c = base_config()
    c.model.preset = "micro"
    c.data.resolution, c.data.num_views = 16, 4
    c.stage1.steps, c.stage1.batch_size = 2, 2
    c.stage1.rescale_start, c.stage1.rescale_end = 1, 2
    c.stage2 = stage_config(("lora",), steps=2, batch_size=2, learning_rate=1e-3)
    c.sample.at_end = False
    c.log_every = c.checkpoint_every = 2
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (
        dict(name="chelsea", images="builtin:chelsea", super_category="cat", templates="animate"),
        dict(name="coffee", images="builtin:coffee", super_category="cup",
             templates="inanimate"),
    )
    c.sweep.grid = (("stage2.learning_rate", (1e-4, 3e-4, 1e-3, 3e-3)),)
    c.sweep.pack = 8
    c.sweep.concept_shards = 0
    summary = sweep(c, tmp_path / "sweep")
    assert summary["runs"] == 8 and len(summary["groups"]) == 1
    assert summary["groups"][0]["compilations"] == [1, 1]
    assert all(r["status"] == "done" for r in summary["results"])

    name = "coffee__learning_rate=0.003"
    folder = tmp_path / "sweep" / "runs" / name
    config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
    train(config, tmp_path / "alone")
    alone, swept = (load_file(f / LORA_NAME) for f in (tmp_path / "alone", folder))
    assert alone.keys() == swept.keys()
    for key, value in swept.items():
        np.testing.assert_allclose(alone[key], value, rtol=1e-5, atol=0.1 * 3e-3, err_msg=key)

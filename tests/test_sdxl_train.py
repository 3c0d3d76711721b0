"""CoRe on SDXL: the step reads both encoders and the added conditioning; `core-jax train` runs
configs/core_sdxl.py end to end on the tiny_sdxl preset and exports the SDXL embedding file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import packing
import pytest
from safetensors.numpy import load_file

from core_jax.train.synthetic import random_setup

ROOT = Path(__file__).resolve().parents[1]


def test_sdxl_step_trains_both_encoders_parts_with_added_conditioning():
    """The learned vector [D1 + D2] moves in both encoders' parts; y_cat's pooled embeddings are
    concept-data constants; every term of CoRe and the thesis is present and finite."""
    setup = random_setup("tiny_sdxl", batch_size=2, lambda_pairwise=0.1, lambda_hinge=0.1,
                         hinge_margin=0.99, pairwise_variant="thesis")
    assert setup.data.cat_hidden.shape[-1] == 32 + 48  # the U-Net's context width
    assert setup.data.cat_pooled.shape[-1] == 40  # encoder 2's projection
    before = np.asarray(setup.state.params["embeds"])[0, 0]
    assert before.shape == (80,)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    assert {"diffusion", "emb", "attn", "pairwise", "hinge"} <= set(history[-1])
    assert all(np.isfinite(float(v[0])) for v in history[-1].values())
    moved = np.abs(np.asarray(state.params["embeds"])[0, 0] - before)
    assert moved[:32].max() > 0 and moved[32:].max() > 0



@pytest.mark.slow
def test_lora_trains_on_sdxl_and_only_its_adapters_move():
    """The lora method on the SDXL U-Net (added conditioning in every pass): the adapters' B
    leave zero, S* and the frozen models stay as they were. The adapters' file loads into
    diffusers' StableDiffusionXLPipeline (tests/test_sdxl_sample.py)."""
    setup = random_setup("tiny_sdxl", batch_size=2, methods=("lora",), learning_rate=1e-3)
    assert set(setup.state.params) == {"embeds", "lora"}
    frozen_before = jax.device_get(setup.frozen)
    state, history = packing.run_steps(setup, packing.one_device_step(setup), 2)
    assert np.isfinite(float(history[-1]["diffusion"][0]))
    np.testing.assert_array_equal(state.params["embeds"], setup.state.params["embeds"])
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(setup.frozen))
    b_leaves = [np.asarray(leaf) for path, leaf in
                jax.tree_util.tree_leaves_with_path(state.params["lora"])
                if jax.tree_util.keystr(path).endswith("'B']")]
    assert b_leaves and sum(np.abs(b).max() > 0 for b in b_leaves) > len(b_leaves) // 2

@pytest.mark.slow
def test_core_sdxl_config_trains_samples_and_exports(tmp_path):
    workdir = tmp_path / "xl"
    cmd = [sys.executable, "-m", "core_jax", "train", "--config",
           str(ROOT / "configs/core_sdxl.py"), "--workdir", str(workdir),
           "--config.data.resolution=64", "--config.data.num_views=4",
           "--config.stage1.steps=4", "--config.stage1.batch_size=2",
           "--config.stage1.rescale_start=1", "--config.stage1.rescale_end=2",
           "--config.stage2.steps=2", "--config.stage2.batch_size=2",
           "--config.concept.images=builtin:chelsea", "--config.concept.super_category=cat",
           "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
           "--config.sample.prompts=('a {} in the snow',)", "--config.sample.at_end=False",
           "--config.log_every=1"]
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stage1 = [r for r in records if r.get("stage") == 1]
    assert stage1 and all(np.isfinite(stage1[-1][k]) for k in ("diffusion", "emb", "attn"))
    vectors = load_file(workdir / "learned_embeds.safetensors")["<s*>"]
    assert vectors.shape == (1, 80)
    sdxl_file = load_file(workdir / "a1111" / "concept.safetensors")
    np.testing.assert_array_equal(sdxl_file["clip_l"], vectors[:, :32])
    np.testing.assert_array_equal(sdxl_file["clip_g"], vectors[:, 32:])
    assert (workdir / "unet" / "config.json").is_file()

    sample = subprocess.run(
        [sys.executable, "-m", "core_jax", "sample", "--workdir", str(workdir), "--prompt",
         "a S* on the beach", "--num_images", "1", "--steps", "2", "--out",
         str(tmp_path / "beach.png")], capture_output=True, text=True, env=env, timeout=900)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (tmp_path / "beach.png").is_file()

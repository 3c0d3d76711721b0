"""`core-jax train` end to end in subprocesses: outputs, resume equality, clean stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=6", "--config.stage1.batch_size=2", "--config.stage1.rescale_start=2",
    "--config.stage1.rescale_end=4", "--config.stage2.steps=4", "--config.stage2.batch_size=2",
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a {} in the snow',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


def train(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "core_jax", "train", "--config", str(ROOT / "configs/tiny_cat.py"),
           "--workdir", str(workdir), *FAST, *extra]
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's run
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def learned(workdir: Path) -> np.ndarray:
    return load_file(workdir / "learned_embeds.safetensors")["<s*>"]


def unet_weights(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(workdir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_default_run_writes_everything(uninterrupted):
    """Every output exists and holds what it claims: the vectors the last checkpoint holds, in
    both embedding formats; a stage-2 U-Net that moved off the base model; one metrics record
    per step with every loss term of its stage; grids of the configured shape."""
    from PIL import Image

    from core_jax import weights
    from core_jax.models.presets import random_models
    from core_jax.train.outputs import latest_checkpoint

    step, items = latest_checkpoint(uninterrupted)
    assert step == 10
    final = np.asarray(items["state"]["params"]["embeds"][0])
    np.testing.assert_array_equal(learned(uninterrupted), final)
    a1111 = load_file(uninterrupted / "a1111" / "chelsea.safetensors")["emb_params"]
    np.testing.assert_array_equal(a1111, final)
    _, trained = weights.load_unet(uninterrupted / "unet")
    base = random_models("micro", 0, np.float32).params["unet"]
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(trained), jax.tree.leaves(base), strict=True)]
    assert any(moved)  # stage 2 trained the U-Net it exported

    records = [json.loads(ln) for ln in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all({"loss", "diffusion", "emb", "attn"} <= r.keys() for r in records if r["stage"] == 1)
    assert all(r.keys() & {"emb", "attn"} == set() for r in records if r["stage"] == 2)
    assert all(np.isfinite(r["loss"]) for r in records)
    result = json.loads((uninterrupted / "result.json").read_text())
    assert result["status"] == "done" and result["step"] == 10

    grids = sorted(p.name for p in (uninterrupted / "samples").iterdir())
    assert grids == ["stage1_step000006.png", "stage2_step000010.png"]
    with Image.open(uninterrupted / "samples" / grids[0]) as grid:
        assert grid.size == (16, 16)  # one prompt x one image of 16 px
    assert (uninterrupted / "loss_curves.png").stat().st_size > 0
    assert list((uninterrupted / "tensorboard").iterdir())
    steps = [int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()]
    assert {6, 10} <= set(steps)  # the end of each stage is always kept


@pytest.mark.slow
def test_stage2_draws_its_own_randomness(uninterrupted):
    """Stage 2 must not replay stage 1's noise, timesteps and views: its key differs."""
    from core_jax.train.outputs import latest_checkpoint
    from core_jax.train.state import stage_keys

    _, items = latest_checkpoint(uninterrupted)  # step 10: stage 2's state
    stage2_rng = np.asarray(items["state"]["rng"])
    np.testing.assert_array_equal(stage2_rng, np.asarray(stage_keys([0], 1)))
    assert not np.array_equal(stage2_rng, np.asarray(stage_keys([0], 0)))


@pytest.mark.slow
def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    # Stop inside stage 1 (between checkpoints) and inside stage 2, resuming each time.
    for stop in ("3", "8"):
        result = train(tmp_path, f"--stop_at_step={stop}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"checkpoint saved at step {stop}" in result.stdout
        assert not (tmp_path / "learned_embeds.safetensors").exists() or stop == "8"
    result = train(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in result.stdout
    np.testing.assert_array_equal(learned(tmp_path), learned(uninterrupted))
    expected = unet_weights(uninterrupted)
    for key, value in unet_weights(tmp_path).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    # Metrics are logged once per step even though steps 4-8 were stopped and resumed.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10


def test_config_of_the_previous_version_reruns_identically():
    """A config.json written before methods were modules (tests/fixtures, made by main at
    73361fe from configs/tiny_cat.py) migrates to exactly today's configs/tiny_cat.py."""
    import importlib.util

    from core_jax.config import migrate
    from core_jax.train.workdir import flatten_config

    spec = importlib.util.spec_from_file_location("tiny_cat", ROOT / "configs/tiny_cat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    today = flatten_config(json.loads(module.get_config().to_json()))
    saved = json.loads((ROOT / "tests/fixtures/config_v1_tiny_cat.json").read_text())
    assert flatten_config(migrate(saved)) == today


def test_workdir_of_the_previous_version_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_bytes(
        (ROOT / "tests/fixtures/config_v1_tiny_cat.json").read_bytes())
    (tmp_path / "checkpoints").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config", str(ROOT / "configs/tiny_cat.py"),
         "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"core-jax: {tmp_path} holds checkpoints of an earlier core-jax (config version 1), "
        "which this one cannot resume; its exports still load. Rerun with --overwrite to train "
        "it again (the same config gives the same run)"
    )


def test_workdir_of_another_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 123}')
    result = train(tmp_path)
    assert result.returncode == 2
    assert "different config" in result.stderr and "Traceback" not in result.stderr

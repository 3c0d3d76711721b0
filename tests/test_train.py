"""`core-jax train` end to end in subprocesses: outputs, resume equality, clean stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    for name in ("learned_embeds.safetensors", "a1111/chelsea.safetensors", "loss_curves.png",
                 "metrics.jsonl", "config.json", "unet/config.json"):
        assert (uninterrupted / name).is_file(), name
    assert sorted(p.name for p in (uninterrupted / "samples").iterdir()) == [
        "stage1_step000006.png", "stage2_step000010.png"
    ]
    assert list((uninterrupted / "tensorboard").iterdir())
    steps = [int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()]
    assert {6, 10} <= set(steps)  # the end of each stage is always kept


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


def test_workdir_of_another_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 123}')
    result = train(tmp_path)
    assert result.returncode == 2
    assert "different config" in result.stderr and "Traceback" not in result.stderr

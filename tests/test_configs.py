"""Every config loads, documents itself, and the paper configs hold DESIGN.md's numbers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_opens_with_documentation(path, tmp_path):
    module = load(path)
    doc = module.__doc__ or ""
    assert "Command" in doc and "core-jax" in doc, "docstring must give the command"
    assert "Time" in doc, "docstring must say how long it takes"
    if path.name == "from_json.py":  # reruns a saved config: give it one
        saved = tmp_path / "config.json"
        saved.write_text(load(ROOT / "configs" / "tiny_cat.py").get_config().to_json())
        assert module.get_config(str(saved)).concept.name == "chelsea"
    else:
        module.get_config()


def test_paper_hyper_parameters():
    c = load(ROOT / "configs" / "core_sd21.py").get_config()
    s1, s2 = c.stage1, c.stage2
    assert (s1.steps, s1.batch_size, s1.learning_rate, s1.weight_decay) == (300, 6, 5e-3, 1e-2)
    assert (s1.b1, s1.b2, s1.clip_norm) == (0.9, 0.999, 0.0)
    assert (s1.lambda_emb, s1.lambda_attn) == (1.5e-4, 0.05)
    assert (s1.rescale_start, s1.rescale_end) == (120, 180)
    assert (s2.steps, s2.batch_size, s2.learning_rate) == (1000, 4, 2e-6)
    assert c.concept.caption == "a photo of a {}" and c.data.resolution == 512
    ti = load(ROOT / "configs" / "ti_sd15.py").get_config()
    assert ti.stage1.lambda_emb == ti.stage1.lambda_attn == 0 and ti.stage2.steps == 0


def test_misspelt_override_fails_naming_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config", str(ROOT / "configs/tiny_cat.py"),
         "--workdir", str(tmp_path / "w"), "--config.stage1.learnin_rate=0.1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config key 'learnin_rate'; did you mean 'learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()

"""Every config loads, documents itself, and the paper configs hold DESIGN.md's numbers."""

from __future__ import annotations

import importlib.util
import re
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


def _commands(doc: str) -> list[tuple[str, str]]:
    """(command, config file) of every `core-jax <command> ... --config <file>` in a docstring,
    continuation lines joined."""
    text = doc.replace("\\\n", " ")
    return re.findall(r"core-jax (\w+)[^\n]*?--config[ =](\S+)", text)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_documents_itself_and_is_valid(path, tmp_path):
    """The docstring gives a command that runs this very file, a time with a number, and what
    it should reach; and the config passes the checks its command makes before any work."""
    from core_jax.train import setup as run_setup
    from core_jax.train.sweep import expand_runs

    module = load(path)
    doc = module.__doc__ or ""
    commands = _commands(doc)
    assert commands, "docstring must give the command"
    for _, named in commands:
        assert Path(named.split(":")[0]).name == path.name, f"the command runs {named}"
    assert re.search(r"^Time[^\n]*\d", doc, re.M), "docstring must say how long it takes"
    assert re.search(r"^What (it should reach|to expect)", doc, re.M), "and what it reaches"
    kind = commands[0][0]
    if path.name == "from_json.py":  # reruns a saved config: give it one
        saved = tmp_path / "config.json"
        saved.write_text(load(ROOT / "configs" / "tiny_cat.py").get_config().to_json())
        config = module.get_config(str(saved))
        assert config.concept.name == "chelsea"
    else:
        config = module.get_config()
    if kind == "train":
        # The paper configs leave the concept to the command line; give them one.
        config.concept.super_category = config.concept.super_category or "teapot"
        run_setup.check_config(config)
    elif kind in ("sweep", "benchmark"):
        runs = expand_runs(config, tmp_path)
        assert runs
        for run in runs:
            run_setup.check_config(run.config)
    elif kind == "dreambench":
        from core_jax.eval.dreambench_run import Subject, training_config

        assert config.dreambench.reference in [m["name"] for m in config.dreambench.methods]
        subject = Subject("dog", "dog", True, (tmp_path / "dog" / "00.jpg",), ())
        runs = expand_runs(training_config(config, [subject]), tmp_path)
        assert [r.name for r in runs] == [f"dog__{m['name']}" for m in config.dreambench.methods]
        for run in runs:
            run_setup.check_config(run.config)


def test_paper_hyper_parameters():
    c = load(ROOT / "configs" / "core_sd21.py").get_config()
    s1, s2 = c.stage1, c.stage2
    assert (s1.steps, s1.batch_size, s1.learning_rate, s1.weight_decay) == (300, 6, 5e-3, 1e-2)
    assert (s1.b1, s1.b2, s1.clip_norm) == (0.9, 0.999, 0.0)
    assert (s1.lambda_emb, s1.lambda_attn) == (1.5e-4, 0.05)
    assert (s1.rescale_start, s1.rescale_end) == (120, 180)
    assert (s2.steps, s2.batch_size, s2.learning_rate) == (1000, 4, 2e-6)
    assert c.concept.caption == "a photo of a {}" and c.data.resolution == 512
    assert s1.methods == ("textual_inversion", "core", "pairwise", "hinge")
    assert s1.lambda_pairwise == s1.lambda_hinge == 0  # the thesis terms are off in the paper
    assert s2.methods == ("unet_finetune",)
    ti = load(ROOT / "configs" / "ti_sd15.py").get_config()
    assert ti.stage1.methods == ("textual_inversion",) and ti.stage2.steps == 0
    assert (ti.stage1.steps, ti.stage1.batch_size, ti.stage1.learning_rate) == (300, 6, 5e-3)


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


def test_saved_config_gains_keys_methods_added_later():
    """A run saved before a method had a key (pairwise_variant) reads back with its default,
    the behaviour it had; keys it has stay as saved, an unknown method is left to check_stage."""
    from core_jax.config import base_config, migrate

    saved = base_config().to_dict()
    del saved["stage1"]["pairwise_variant"]
    saved["stage1"]["lambda_pairwise"] = 0.5
    saved["stage2"]["methods"] = ["no_such_method"]
    migrated = migrate(saved)
    assert migrated["stage1"]["pairwise_variant"] == "context"
    assert migrated["stage1"]["lambda_pairwise"] == 0.5
    assert "pairwise_variant" not in saved["stage1"]  # the caller's dict is not changed
    assert migrated["stage2"]["methods"] == ["no_such_method"]


@pytest.mark.parametrize("name", ["dreambench_sd21.py", "dreambench_sd15.py"])
def test_dreambench_configs_hold_the_protocol_and_the_paper_settings(name, tmp_path):
    from core_jax.eval.dreambench import read_protocol
    from core_jax.eval.dreambench_run import Subject, training_config
    from core_jax.train.sweep import expand_runs

    module = load(ROOT / "configs" / name)
    c = module.get_config()
    b = c.dreambench
    assert (b.images_per_prompt, b.reference, b.identity_excludes) == (4, "ti", ())
    assert c.data.resolution == 512
    subject = Subject("dog", "dog", True, (tmp_path / "dog" / "00.jpg",), ())
    runs = {r.name: r.config for r in expand_runs(training_config(c, [subject]), tmp_path)}
    ti, core = runs["dog__ti"], runs["dog__core"]
    paper = load(ROOT / "configs" / "core_sd21.py").get_config()
    assert core.stage1.to_dict() == paper.stage1.to_dict()
    assert core.stage2.to_dict() == paper.stage2.to_dict()
    assert ti.stage1.methods == ("textual_inversion",) and ti.stage2.steps == 0
    assert (ti.stage1.steps, ti.stage1.batch_size, ti.stage1.learning_rate) == (300, 6, 5e-3)
    # CoRe's variant leaves out exactly the live list's outfit / accessory prompts.
    protocol = read_protocol(ROOT / "tests" / "fixtures" / "dreambench_prompts_and_classes.txt")
    excluded = module.get_config("core").dreambench.identity_excludes
    assert len(excluded) == 10 and set(excluded) <= set(protocol.live_prompts)
    assert not set(excluded) & set(protocol.object_prompts)

"""`core-jax dreambench` on a fake DreamBench root (2 subjects x 2 methods x 2 prompts) with
micro random SD weights and tiny CLIP / DINO folders saved here by transformers: the outputs,
a rerun that redoes nothing, 2 processes x 4 devices = 1 x 8, the preflight's one-line errors;
the per-image seeds and the statistics; a real-weights smoke run when CORE_JAX_*_PATH are set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from skimage import data as skimage_data
from test_scores import clip_folder, dino_folder  # noqa: F401  (fixtures)

from core_jax.config import base_config
from core_jax.eval import dreambench_run
from core_jax.eval.dreambench import read_protocol
from core_jax.eval.score_folder import score_folder
from core_jax.eval.stats import holm, paired_p
from core_jax.sample import generate, generate_seeded, random_pipeline

ROOT = Path(__file__).resolve().parents[1]
REAL_PROTOCOL = ROOT / "tests" / "fixtures" / "dreambench_prompts_and_classes.txt"
EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
ONE = {**os.environ, "XLA_FLAGS": ""}
SUBJECTS = {"dog": skimage_data.chelsea, "teapot": skimage_data.coffee}  # live, object


def short_protocol(path: Path, prompts: int = 2) -> None:
    """The real file with each prompt list cut to its first `prompts` lines."""
    out, kept = [], None
    for line in REAL_PROTOCOL.read_text().splitlines():
        if line.startswith("prompt_list"):
            kept = 0
        elif kept is not None and line.strip() != "]":
            kept += 1
            if kept > prompts:
                continue
        elif line.strip() == "]":
            kept = None
        out.append(line)
    path.write_text("\n".join(out) + "\n")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    short_protocol(root / dreambench_run.PROTOCOL_FILE)
    for name, photo in SUBJECTS.items():
        (root / name).mkdir()
        image = photo()
        for i, flip in enumerate((False, True)):
            Image.fromarray(image[:, ::-1] if flip else image).save(root / name / f"{i:02d}.jpg")
    return root


def tiny_config(root: Path, clip: Path, dino: Path) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.preset = "micro"
    c.data.resolution = 16
    c.data.num_views = 2
    c.stage1.steps = 2
    c.stage1.batch_size = 2
    c.stage1.rescale_start = 0
    c.stage1.rescale_end = 0
    c.stage2.steps = 0
    c.stage2.batch_size = 2
    c.sample.at_end = False
    c.log_every = 1
    c.checkpoint_every = 2
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = ()
    c.sweep.pack = 4
    c.sweep.concept_shards = 0
    c.dreambench = dreambench_run.dreambench_config(
        [dict(name="ti", overrides={"stage1.methods": ("textual_inversion",),
                                    "stage1.lambda_emb": 0.0, "stage1.lambda_attn": 0.0}),
         dict(name="core", overrides={"stage2.steps": 1})],
        reference="ti")
    c.dreambench.root = str(root)
    c.dreambench.clip = str(clip)
    c.dreambench.dino = str(dino)
    c.dreambench.images_per_prompt = 2
    c.dreambench.steps = 2
    c.dreambench.batch_size = 4
    c.dreambench.score_batch_size = 8
    c.dreambench.grid_size = 16
    return c


def command(config_path: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "core_jax", "dreambench", "--config", str(config_path),
            "--workdir", str(workdir)]


def write_config(path: Path, config: ml_collections.ConfigDict) -> Path:
    path.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return path


def rows(workdir: Path) -> dict[str, dict]:
    lines = (workdir / "scores.jsonl").read_text().splitlines()
    return {r["key"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def finished(fake_root, clip_folder, dino_folder, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("dreambench")
    config = write_config(base / "config.py", tiny_config(fake_root, clip_folder, dino_folder))
    workdir = base / "work"
    result = subprocess.run(command(config, workdir), capture_output=True, text=True,
                            env=EIGHT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, workdir, result


@pytest.mark.slow
def test_end_to_end_writes_every_output_and_a_rerun_redoes_nothing(finished, tmp_path):
    config, workdir, first = finished
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["methods"]) == {"ti", "core"}
    scored = rows(workdir)
    # 2 subjects x 2 methods x 2 prompts x 2 images, each with every score in [-1, 1].
    assert len(scored) == 16 and results["images_scored"] == 16
    for row in scored.values():
        assert all(-1 <= row[k] <= 1 for k in ("clip_t", "clip_t_no_class", "clip_i", "dino"))
    dog = [r for r in scored.values() if r["subject"] == "dog"]
    # The live subject got the live prompts, CLIP-T's text the class word in place of S*.
    live = read_protocol(REAL_PROTOCOL).live_prompts[:2]
    assert sorted({r["template"] for r in dog}) == sorted(live)
    assert {r["prompt"] for r in dog} >= {"a S* dog in the jungle"}
    assert results["work"]["images_sampled"] == 16 and results["work"]["runs_trained"] == 4
    for method in ("ti", "core"):
        s = results["methods"][method]
        assert s["subjects"] == 2 and s["clip_t"]["n"] == 2
        assert Path(results["grids"][method]).is_file()
    assert "p_holm" in results["methods"]["core"]["clip_i_vs_reference"]
    assert results["used"]["clip"]["sha256"] and results["used"]["versions"]["jax"]
    assert (workdir / "runs" / "dog__core" / "unet" / "config.json").is_file()
    table = (workdir / "results.md").read_text()
    assert "| core | 2 |" in table and "p (Holm)" in table
    # The same noise for every method: the images differ only by what each run learned.
    assert len(list((workdir / "samples" / "dog__ti").glob("*.png"))) == 4

    # `core-jax score` on a run's samples (with the prompts.jsonl written beside them) gives
    # the same per-image scores: the path another tool's images take (docs/evaluation.md).
    folder = workdir / "samples" / "dog__core"
    score_folder(folder, folder / "prompts.jsonl", Path(results["protocol"]["root"]) / "dog",
                 results["used"]["clip"]["path"], results["used"]["dino"]["path"],
                 out=tmp_path, echo=lambda _: None)
    theirs = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(theirs) == 4
    for row in theirs:
        prompt, image = int(row["image"][1:3]), int(row["image"][4:6])
        ours = scored[dreambench_run.row_key("core", "dog", prompt, image)]
        assert row["prompt"] == ours["prompt"]
        for score in ("clip_t", "clip_i", "dino"):
            assert row[score] == pytest.approx(ours[score], abs=1e-6), (row, score)

    before = (workdir / "scores.jsonl").read_bytes()
    again = subprocess.run(command(config, workdir), capture_output=True, text=True, env=EIGHT,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    work = json.loads((workdir / "results.json").read_text())["work"]
    assert work == {"runs_trained": 0, "images_sampled": 0, "images_scored": 0,
                    "compilations": 0}
    assert (workdir / "scores.jsonl").read_bytes() == before


@pytest.mark.slow
def test_two_processes_sample_and_score_as_one(finished, tmp_path):
    """Sampling and scoring (split by run over 2 processes x 4 devices, jax.distributed over
    127.0.0.1) give 1 x 8's scores. Training is the sweep's, whose 2-process equality
    tests/test_sweep.py shows, so the trained runs are reused here."""
    config, workdir, _ = finished
    copy = tmp_path / "work"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
        "samples", "scores*.jsonl", "results.*", "grids"))
    result = subprocess.run(
        ["bash", str(ROOT / "launch/local_multiprocess.sh"), "2", "4", "dreambench",
         "--config", str(config), "--workdir", str(copy)],
        capture_output=True, text=True, env=ONE, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    work = json.loads((copy / "results.json").read_text())["work"]
    assert work["images_sampled"] == work["images_scored"] == 16 and work["runs_trained"] == 0
    ours, theirs = rows(copy), rows(workdir)
    assert ours.keys() == theirs.keys()
    for key, row in theirs.items():
        for score in ("clip_t", "clip_t_no_class", "clip_i", "dino"):
            assert ours[key][score] == pytest.approx(row[score], abs=1e-6), key


def test_preflight_reports_each_problem_in_one_line_before_any_compile(
        fake_root, clip_folder, dino_folder, tmp_path):  # noqa: F811
    root = tmp_path / "dataset"
    shutil.copytree(fake_root, root)
    (root / "teapot" / "00.jpg").unlink()
    (root / "teapot" / "01.jpg").unlink()
    protocol = root / dreambench_run.PROTOCOL_FILE
    protocol.write_text(protocol.read_text().replace("dog,dog\n", "dog,<|endoftext|>\n", 1))
    config = tiny_config(root, dino_folder, dino_folder)  # CLIP given a DINO folder
    config.dreambench.subjects = "dog,teapot,unicorn"
    config.dreambench.reference = "dreambooth"
    config = write_config(tmp_path / "config.py", config)
    result = subprocess.run(command(config, tmp_path / "w"), capture_output=True, text=True,
                            env=ONE, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("core-jax: ") for line in lines), result.stderr
    expected = ["'dreambooth' is not one of the methods", "names 'unicorn'",
                "subject 'teapot'", "has no images", "is not a CLIP model folder",
                "class word '<|endoftext|>' tokenizes to special tokens"]
    for part in expected:
        assert sum(part in line for line in lines) >= 1, (part, result.stderr)
    assert "Traceback" not in result.stderr and not (tmp_path / "w" / "runs").exists()


def test_each_image_has_its_own_seed_whatever_its_batch():
    pipeline = random_pipeline("micro")
    prompts = ["a <s*> dog", "a <s*> dog on the beach", "a cat"]
    learned = np.random.default_rng(0).normal(size=(1, pipeline.embed_dim)).astype(np.float32)
    seeds = [dreambench_run.image_seed(0, "dog", p, 0) for p in prompts]
    batch = generate_seeded(pipeline, prompts, seeds, learned, steps=2, height=16, width=16)
    for prompt, seed, image in zip(prompts, seeds, batch, strict=True):
        alone = generate(pipeline, [prompt], learned, seed=seed, steps=2, height=16, width=16)
        # The same noise and prompt: at most a rounding step of uint8 from batch numerics.
        assert np.abs(alone[0].astype(int) - image).max() <= 1
    assert dreambench_run.image_seed(0, "dog", "a {0} {1}", 1) != seeds[0]


def test_summary_intervals_paired_differences_and_holm():
    rng = np.random.default_rng(0)
    records = []
    truth = {"a": {}, "b": {}}
    for method, shift in (("a", 0.0), ("b", 0.05)):
        for s in range(5):
            for template in ("x {0} {1}", "a red {0} {1}"):
                value = 0.5 + 0.01 * s + shift + rng.normal() * 1e-3
                truth[method].setdefault(s, []).append((template, value))
                records.append({"method": method, "subject": f"s{s}", "template": template,
                                "clip_t": value, "clip_t_no_class": value - 0.1,
                                "clip_i": value, "dino": value})
    summary = dreambench_run.summarize(records, ["a", "b"], "a", True, ("a red {0} {1}",))
    clip_i = {m: [np.mean([v for t, v in truth[m][s] if t == "x {0} {1}"]) for s in range(5)]
              for m in "ab"}
    assert summary["b"]["clip_i"]["mean"] == pytest.approx(np.mean(clip_i["b"]))
    d = np.subtract(clip_i["b"], clip_i["a"])
    vs = summary["b"]["clip_i_vs_reference"]
    assert vs["p"] == pytest.approx(stats.ttest_rel(clip_i["b"], clip_i["a"]).pvalue)
    assert vs["mean"] == pytest.approx(d.mean())
    no_class = dreambench_run.summarize(records, ["a", "b"], "a", False, ())
    assert no_class["a"]["clip_t"]["mean"] == pytest.approx(summary["a"]["clip_t"]["mean"] - 0.1)
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert paired_p([0.1]) != paired_p([0.1])  # NaN below two pairs


@pytest.mark.skipif(not all(os.environ.get(f"CORE_JAX_{k}_PATH") for k in ("SD", "CLIP", "DINO")),
                    reason="set CORE_JAX_SD_PATH, CORE_JAX_CLIP_PATH and CORE_JAX_DINO_PATH")
@pytest.mark.slow
def test_real_weights_smoke(fake_root, tmp_path):
    """One subject, TI for 2 steps, 1 prompt x 1 image of 20 steps with real SD, CLIP and DINO:
    the command runs and its scores are those of real models (a photo-like image of the class
    scores well above chance)."""
    config = tiny_config(fake_root, Path(os.environ["CORE_JAX_CLIP_PATH"]),
                         Path(os.environ["CORE_JAX_DINO_PATH"]))
    config.model.path = os.environ["CORE_JAX_SD_PATH"]
    config.data.resolution = 512
    config.dreambench.subjects = "dog"
    config.dreambench.methods = (config.dreambench.methods[0],)
    config.dreambench.images_per_prompt = 1
    config.dreambench.steps = 20
    config.dreambench.batch_size = 1
    config.dreambench.grid_size = 64
    path = write_config(tmp_path / "config.py", config)
    result = subprocess.run(command(path, tmp_path / "w"), capture_output=True, text=True,
                            env=ONE, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["methods"]["ti"]["clip_t"]["mean"] > 0.15
    assert results["used"]["model"]["sha256"]

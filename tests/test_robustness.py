"""Nothing lost, nothing silent: preemption, hard kills, non-finite stops and hostile inputs.

Bad inputs go through `core-jax train`'s own entry (`run_reporting_input_errors(train, ...)`)
in this process: each must end in one `core-jax: ...` line, exit code 2 and no workdir. The slow
tests run the CLI in subprocesses on the micro preset and interrupt it: SIGTERM/SIGINT, SIGKILL
at seeded moments (one of them while a checkpoint is being written) and a forced NaN.
docs/robustness.md lists every case with the line the user sees.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from safetensors.numpy import load_file

from core_jax import data, weights
from core_jax.commands import run_reporting_input_errors
from core_jax.models.presets import random_models
from core_jax.text import clip_tokenizer_dir
from core_jax.train import loop
from core_jax.train.checkpoints import RunCheckpoints
from core_jax.train.runlog import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
# The micro run of tests/test_train.py, checkpointing every step so that kills find writes.
FAST = {
    "model.preset": "micro", "data.resolution": 16, "data.num_views": 4, "stage1.steps": 6,
    "stage1.batch_size": 2, "stage1.rescale_start": 2, "stage1.rescale_end": 4,
    "stage2.steps": 4, "stage2.batch_size": 2, "sample.steps": 2, "sample.images_per_prompt": 1,
    "sample.prompts": ("a {} in the snow",), "log_every": 1, "checkpoint_every": 1,
}
TOTAL = 10


# --------------------------------------------------------------------------------------------
# Hostile inputs, in process


def make_config(**overrides: object) -> ml_collections.ConfigDict:
    """configs/tiny_cat.py with FAST and `overrides` (dots spelt `__`); batches fill every
    device this process sees (8 virtual CPUs), so only the input under test is wrong."""
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs/tiny_cat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    devices = jax.device_count()
    values = {**FAST, "stage1.batch_size": devices, "stage2.batch_size": devices}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def refused(
    capsys: pytest.CaptureFixture, workdir: Path, config: ml_collections.ConfigDict, **kwargs
) -> tuple[str, list[str]]:
    """Run `train` as the CLI does; it must exit 2. Returns (error line, warning lines)."""
    with pytest.raises(SystemExit) as exited:
        run_reporting_input_errors(loop.train, config, workdir, **kwargs)
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2, lines
    warnings_ = [ln for ln in lines if ln.startswith("core-jax: warning: ")]
    errors = [ln for ln in lines if ln not in warnings_]
    assert len(errors) == 1 and errors[0].startswith("core-jax: "), lines
    return errors[0].removeprefix("core-jax: "), [w.split(": ", 2)[2] for w in warnings_]


def photos(folder: Path, *names: str, size: tuple[int, int] = (24, 20)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def truncated_png(path: Path) -> None:
    photos(path.parent, path.name, size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])


# (config overrides, the line `core-jax: ` is followed by); "{tmp}" stands for tmp_path.
BAD_CONFIGS = {
    "resolution not VAE multiple": (
        {"data__resolution": 15},
        "data.resolution 15 is not a multiple of the VAE's factor 2 (the model was trained at 16)",
    ),
    "unknown emb variant": (
        {"stage1__emb_variant": "papper"},
        "stage1.emb_variant is 'papper'; choose one of paper, code",
    ),
    "unknown attn variant": (
        {"stage1__attn_variant": "offical"},
        "stage1.attn_variant is 'offical'; choose one of paper, code",
    ),
    "unknown sampler": (
        {"sample__sampler": "euler"}, "sample.sampler is 'euler'; choose one of ddim, dpmpp_2m"
    ),
    "unknown preset": (
        {"model__preset": "huge"},
        "model.preset is 'huge'; choose one of tiny, micro, bench_small, sd15, sd21, sdxl, "
        "tiny_sdxl",
    ),
    "unknown template set": (
        {"concept__templates": "animals"},
        "concept.templates: animals is neither a built-in template set ('animate', 'inanimate') "
        "nor a file",
    ),
    "num_vectors 0": (
        {"concept__num_vectors": 0}, "concept.num_vectors is 0; it must be at least 1"
    ),
    "empty super-category": (
        {"concept__super_category": " "},
        "concept.super_category is empty: set it to the word for what the concept is, e.g. "
        "--config.concept.super_category=dog",
    ),
    "placeholder is a word": (
        {"concept__placeholder": "corgi"},
        "placeholder token 'corgi' already tokenizes as the existing token 'corgi</w>' (id 31320); "
        "adding it would change the meaning of that word, choose e.g. '<name>'",
    ),
    "placeholder is a token": (
        {"concept__placeholder": "<|endoftext|>"},
        "placeholder token '<|endoftext|>' is already in the tokenizer's vocabulary (id 49407); "
        "choose another placeholder string",
    ),
    "placeholder with space": (
        {"concept__placeholder": "my cat"},
        "placeholder 'my cat' must be non-empty and without whitespace",
    ),
    "caption without slot": (
        {"concept__caption": "a photo of S*"},
        "template 'a photo of S*' must contain exactly one '{}'",
    ),
    "sample prompt with brace": (
        {"sample__prompts": ("a {} in {the} snow",)},
        "template 'a {} in {the} snow' has a brace besides its one '{}'",
    ),
    "learning rate 0": (
        {"stage2__learning_rate": 0.0}, "stage2.learning_rate is 0.0; it must be a positive number"
    ),
    "checkpoint_every 0": (
        {"checkpoint_every": 0}, "checkpoint_every is 0; it must be at least 1"
    ),
    "images folder missing": (
        {"concept__images": "{tmp}/nope"}, "Concept folder '{tmp}/nope' does not exist."
    ),
    "model folder missing": (
        {"model__path": "{tmp}/nowhere"}, "model folder {tmp}/nowhere does not exist"
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    overrides, expected = BAD_CONFIGS[case]
    overrides = {
        k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
        for k, v in overrides.items()
    }
    line, _ = refused(capsys, tmp_path / "run", make_config(**overrides))
    assert line == expected.replace("{tmp}", str(tmp_path))
    assert not (tmp_path / "run").exists()


def test_stop_at_step_below_one(tmp_path, capsys):
    line, _ = refused(capsys, tmp_path / "run", make_config(), stop_at_step=0)
    assert line == "--stop_at_step is 0; it must be at least 1"
    assert not (tmp_path / "run").exists()


def test_unusable_photo_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line, _ = refused(capsys, tmp_path / "run", make_config(concept__images=str(empty)))
    assert line == f"Concept folder '{empty}' is empty."

    bad = tmp_path / "bad"
    truncated_png(bad / "cut.png")
    (bad / "notes.txt").write_text("not a photo")
    (bad / "empty.jpg").write_bytes(b"")
    line, warned = refused(capsys, tmp_path / "run", make_config(concept__images=str(bad)))
    assert line == (
        f"No readable image in '{bad}' (skipped: cut.png, empty.jpg, notes.txt); supported "
        "types are .jpg, .jpeg, .png, .webp, .bmp."
    )
    assert len(warned) == 3 and all(w.startswith(f"Skipping {bad}/") for w in warned)
    assert not (tmp_path / "run").exists()


def test_warnings_are_one_line_each_and_come_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    """Bad photos beside good ones, a small photo, a super-category outside the vocabulary and
    over-long prompts all warn, one line each, while the run goes on to its set-up."""
    folder = photos(tmp_path / "photos", "a.png", "b.png")
    photos(folder, "small.png", size=(8, 8))
    truncated_png(folder / "cut.png")
    (folder / "notes.txt").write_text("not a photo")
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} in the snow\n" + "a {} " + "very " * 80 + "far away\n")
    long_prompt = "a {} " + "with a hat " * 30
    config = make_config(
        concept__images=str(folder), concept__super_category="xqzvcat",
        concept__templates=str(templates), sample__prompts=(long_prompt,),
    )

    def reached(workdir: Path, *args: object) -> None:
        assert not workdir.exists()
        raise loop.InputError("set-up reached")

    monkeypatch.setattr(loop, "prepare_workdir", reached)
    line, warned = refused(capsys, tmp_path / "run", config)
    assert line == "set-up reached"
    assert warned[:2] == [
        f"Skipping {folder}/cut.png: cannot read it as an image (image file is truncated).",
        f"Skipping {folder}/notes.txt: not a supported image type (.jpg, .jpeg, .png, .webp, "
        ".bmp).",
    ]
    assert warned[2] == f"{folder}/small.png is only 8x8 pixels, below 16; it will be upscaled."
    assert warned[3].startswith("super-category 'xqzvcat' is not one token of the vocabulary but ")
    assert "'cat</w>'" in warned[3]
    assert re.fullmatch(r"template 'a \{\} very .*': prompt of 86 \(y\*\) / 90 \(y_cat\) "
                        r"tokens truncated to 77; context beyond it is not regularized", warned[4])
    assert re.fullmatch(r"prompt 'a <s\*> with a hat .*' is 9\d tokens, truncated to 77",
                        warned[5])
    assert len(warned) == 6


def test_template_holding_the_placeholder(tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} next to another <s*>\n")
    line, _ = refused(capsys, tmp_path / "run", make_config(concept__templates=str(templates)))
    assert line == (
        "template 'a {} next to another <s*>': the placeholder tokens [49408] occur 2 times in "
        "the filled prompt, expected exactly once"
    )


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The micro preset as a diffusers folder, without a scheduler config."""
    folder = tmp_path_factory.mktemp("model")
    models = random_models("micro")
    weights.save_text_encoder(folder / "text_encoder", models.text_encoder, models.params["text"])
    weights.save_unet(folder / "unet", models.unet, models.params["unet"])
    weights.save_vae(folder / "vae", models.vae, models.params["vae"])
    shutil.copytree(clip_tokenizer_dir(), folder / "tokenizer")
    return folder


def _missing_weights(unet: Path) -> None:
    (unet / "diffusion_pytorch_model.safetensors").unlink()


def _wider_config(unet: Path) -> None:
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 48}))


def _only_pickle(unet: Path) -> None:
    weights_file = unet / "diffusion_pytorch_model.safetensors"
    weights_file.rename(unet / "diffusion_pytorch_model.bin")


def _truncated(unet: Path) -> None:
    weights_file = unet / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])


BAD_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights missing": (
        _missing_weights,
        "{unet} has no weights (diffusion_pytorch_model.safetensors or a sharded index)",
    ),
    "shapes mismatch": (
        _wider_config,
        "{unet}: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight has shape "
        "(32, 32), the model config expects (32, 48); does config.json match?",
    ),
    "only pickled": (
        _only_pickle,
        "{unet} has only pickled weights (diffusion_pytorch_model.bin); pickles can run code "
        "when loaded. Convert them to safetensors, or if you trust the file set allow_pickle "
        "(--config.model.allow_pickle=True)",
    ),
    "truncated weights": (
        _truncated,
        "cannot read the model folder {model}: Error while deserializing header: invalid header "
        "length",
    ),
    "no tokenizer": (
        lambda unet: shutil.rmtree(unet.parent / "tokenizer"),
        "no tokenizer in {model}: expected {model}/tokenizer/vocab.json or {model}/vocab.json",
    ),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_folder(case, model_folder, tmp_path, capsys):
    spoil, expected = BAD_MODELS[case]
    model = tmp_path / "model"
    shutil.copytree(model_folder, model)
    spoil(model / "unet")
    line, warned = refused(capsys, tmp_path / "run", make_config(model__path=str(model)))
    assert line == expected.format(unet=model / "unet", model=model)
    assert not (tmp_path / "run").exists()


def test_model_folder_without_scheduler_warns(model_folder, tmp_path, capsys):
    config = make_config(model__path=str(model_folder), data__resolution=15)
    line, warned = refused(capsys, tmp_path / "run", config)
    assert line.startswith("data.resolution 15 is not a multiple")  # checked after loading
    assert warned == [
        f"{model_folder} has no scheduler/scheduler_config.json; using Stable Diffusion's "
        "default schedule (scaled_linear betas, epsilon prediction)"
    ]


def test_workdirs_refused_untouched(tmp_path, capsys):
    config = make_config()
    afile = tmp_path / "afile"
    afile.write_text("x")
    line, _ = refused(capsys, afile, config)
    assert line == f"--workdir {afile} is a file, not a folder"

    foreign = tmp_path / "documents"
    (foreign / "thesis.tex").parent.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    line, _ = refused(capsys, foreign, config, overwrite=True)
    assert line == (
        f"--overwrite would delete {foreign}, which is not a core-jax run (no config.json); "
        "choose another --workdir"
    )
    assert (foreign / "thesis.tex").read_text() == "precious"

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(make_config().to_json())
    inside = photos(run / "photos", "a.png")
    line, _ = refused(capsys, run, make_config(concept__images=str(inside)), overwrite=True)
    assert line == f"--overwrite would delete {inside}, an input of this run inside {run}"
    assert (inside / "a.png").is_file()

    (run / "config.json").write_text("{not json")
    line, _ = refused(capsys, run, config)
    assert line.startswith(f"cannot read {run}/config.json (Expecting property name")
    assert line.endswith("; --overwrite starts afresh")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "photos"]


# --------------------------------------------------------------------------------------------
# Atomic outputs and half-written checkpoints, in process


def test_sample_grid_is_atomic_and_respects_the_umask(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        path = data.save_image_grid(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "grid.png")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
    before = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        data.save_image_grid(np.ones((2, 4, 4, 3), np.uint8), path)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    assert path.read_bytes() == before


def test_metrics_resume_drops_redone_and_torn_lines(tmp_path):
    records = [json.dumps({"stage": 1, "step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + '\n{"stage": 1, "st')
    MetricsLog(tmp_path, start_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(records[:2]) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    """What a kill during a write leaves (a `<step>.orbax-checkpoint-tmp` folder) is never taken
    for a step, and the next run's manager deletes it before writing that step again."""
    state = {"embedding": {"v": jnp.arange(4.0)}}
    checkpoints = RunCheckpoints(tmp_path, keep=3, stage_ends=[])
    checkpoints.save(1, state)
    checkpoints.close()
    torn = tmp_path / "2.orbax-checkpoint-tmp"
    (torn / "embedding").mkdir(parents=True)
    (torn / "embedding" / "manifest.ocdbt").write_bytes(b"\0" * 10)

    checkpoints = RunCheckpoints(tmp_path, keep=3, stage_ends=[])
    assert checkpoints.latest_step() == 1
    restored = checkpoints.restore(1, state)
    np.testing.assert_array_equal(restored["embedding"]["v"], state["embedding"]["v"])
    checkpoints.save(2, {"embedding": {"v": jnp.ones(4)}})
    checkpoints.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    assert RunCheckpoints(tmp_path, keep=3, stage_ends=[]).latest_step() == 2


# --------------------------------------------------------------------------------------------
# Interrupted runs, in subprocesses

# One CPU device, as a user's run; unbuffered, so a killed run's last lines are in its log.
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}


def _flags() -> list[str]:
    return [f"--config.{key}={value}" for key, value in FAST.items()]


def _command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "core_jax", "train",
            "--config", str(ROOT / "configs/tiny_cat.py"), "--workdir", str(workdir),
            *_flags(), *extra]


def train(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, *extra), capture_output=True, text=True, env=ENV,
                          timeout=600)


class Run:
    """A training subprocess whose output goes to files (a full pipe would stall it)."""

    def __init__(self, workdir: Path, logs: Path, *extra: str):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(_command(workdir, *extra), stdout=out, stderr=err,
                                         env=ENV)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 400) -> bool:
        """Poll (every millisecond: checkpoint writes last tens of them) until `condition`;
        False if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.001)
        raise TimeoutError(f"condition not met in {timeout} s")

    def steps_shown(self) -> int:
        """The last step this run's progress bar showed: its own stderr, unlike metrics.jsonl,
        which still holds the steps a killed run did past its last checkpoint."""
        shown = re.findall(rf"\| *(\d+)/{TOTAL} \[", self.err.read_text())
        return max(map(int, shown), default=0)

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=400)
        return code, self.out.read_text(), self.err.read_text()


def checkpoint_names(workdir: Path) -> list[str]:
    try:
        return os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
        return []


def complete_steps(workdir: Path) -> list[int]:
    return sorted(int(name) for name in checkpoint_names(workdir) if name.isdigit())


@pytest.mark.slow
def test_stopped_and_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """One workdir is interrupted four ways in turn, resuming each time: SIGTERM in stage 1,
    SIGKILL while checkpoint n is being written, SIGINT in stage 2, SIGKILL at a drawn moment
    (n, moment and delay drawn from a seeded generator). The last run must end where a run
    never interrupted ends, bit for bit. One chain rather than a test per way: every run
    costs ~20 s of start-up on a 2-core machine."""
    reference = tmp_path / "uninterrupted"
    result = train(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir, rng = tmp_path / "run", random.Random(6)

    def writing(step: int) -> bool:
        return any(name.startswith(f"{step}.orbax-checkpoint-tmp")
                   for name in checkpoint_names(workdir))

    def interrupt(name: str, condition: Callable[[Run], bool], delay: float = 0.0) -> str:
        """Start a run, send `name` once `condition` holds and this run has done a step (so its
        handlers are in place); the run's stdout."""
        resumed_at = (complete_steps(workdir) or [0])[-1]
        run = Run(workdir, tmp_path / f"run{len(list(tmp_path.glob('*.out')))}")
        if run.wait_for(lambda: run.steps_shown() > resumed_at and condition(run)):
            time.sleep(delay)
        run.proc.send_signal(getattr(signal, name))
        code, out, err = run.finish()
        if resumed_at:
            assert f"resumed {workdir} at step {resumed_at} of {TOTAL}" in out, out
        if name != "SIGKILL":
            assert code == 0 and "Traceback" not in err, err[-3000:]
        return out

    def clean_stop(name: str, after: int) -> None:
        """Exit 0, the message, the checkpoint at the step reached, no exports yet."""
        out = interrupt(name, lambda run: run.steps_shown() >= after)
        stop = re.search(rf"^{name} received: checkpoint saved at step (\d+) of {TOTAL}; run the "
                         "same command again to resume$", out, re.MULTILINE)
        assert stop, out
        assert int(stop[1]) >= after and int(stop[1]) == complete_steps(workdir)[-1]
        assert not (workdir / "a1111").exists()

    clean_stop("SIGTERM", after=2)
    # Killed mid-write: that step is left half-written and is not taken for a whole one.
    first = complete_steps(workdir)[-1] + 1
    n = rng.randint(first, max(first, 5))
    interrupt("SIGKILL", lambda run: writing(n))
    assert writing(n) and complete_steps(workdir)[-1] < n
    clean_stop("SIGINT", after=7)
    kill_after, delay = rng.randint(8, 9), rng.uniform(0, 0.3)
    interrupt("SIGKILL", lambda run: run.steps_shown() >= kill_after, delay)

    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {workdir} at step " in result.stdout
    embeds = [load_file(w / "learned_embeds.safetensors")["<s*>"] for w in (workdir, reference)]
    np.testing.assert_array_equal(*embeds)
    unet = "unet/diffusion_pytorch_model.safetensors"
    expected = load_file(reference / unet)
    for key, value in load_file(workdir / unet).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    steps = [json.loads(ln)["step"] for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL + 1))  # each step logged once, however often resumed
    assert all(name.isdigit() for name in checkpoint_names(workdir))  # the torn write is gone


@pytest.mark.slow
def test_nonfinite_streak_stops_naming_step_and_term(tmp_path):
    """A learning rate of 1e30 makes the embedding huge after step 1, so every later step's loss
    is NaN: steps 2 and 3 are skipped and the run stops at step 3 with exit code 3."""
    result = train(tmp_path, "--config.stage1.learning_rate=1e30", "--config.max_nonfinite=2")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"core-jax: stage 1 step 3: 2 steps in a row skipped because (\w+, )*diffusion, "
        r"(\w+, )*loss went non-finite; the state is the last finite one \(lower the learning "
        r"rate, check the photos, or try fp32\)", last
    ), last
    # The skipped step 2 left the state as step 1 made it, but for its counters.
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute(), options=options) as m:
        one, two = (m.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                    ["state"] for s in (1, 2))
    np.testing.assert_array_equal(two["params"]["embeds"], one["params"]["embeds"])
    jax.tree.map(np.testing.assert_array_equal, two["opt_state"], one["opt_state"])
    assert (int(one["step"][0]), int(two["step"][0])) == (1, 2)
    assert int(two["nonfinite_streak"][0]) == 1

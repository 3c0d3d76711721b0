"""Nothing lost when two jobs meet one workdir, when a checkpoint is damaged, or when a flag is
wrong (issue 19).

- The workdir lock (`core_jax.workdir_lock`): exclusive, released on exit and on signals, taken
  over from a dead process, refused (with how to remove it) when another host holds it; a second
  writer exits 2 in one line and touches nothing; two trains started at once: one trains, and
  its result equals a run alone.
- Checkpoint integrity (`core_jax.train.checkpoints`): bytes flipped in each kind of file of the
  newest step (array data, array metadata, the checkpoint's own metadata, the manifest): the
  step is skipped with one warning line and the run resumes from the newest intact step, ending
  equal to an uninterrupted run; when no step is intact, one line and exit 2.
- Flag parsing: every error is one `core-jax: ` line with exit code 2.
docs/robustness.md lists the lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from core_jax.errors import InputError
from core_jax.train import outputs
from core_jax.train.checkpoints import MANIFEST, RunCheckpoints, verify_step
from core_jax.workdir_lock import (
    WorkdirLock,
    WorkdirLocked,
    lock_path,
    process_zero_lock,
    workdir_lock,
)

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
# One CPU device, as a user's run; unbuffered, so a killed run's last lines are in its log.
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}


def flip(path: Path, where: float | int = 0.5) -> None:
    """Flip the bits of one byte of `path`: at `where` of its length, or at byte `where`."""
    data = bytearray(path.read_bytes())
    index = where if isinstance(where, int) else int(len(data) * where)
    data[min(index, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and contents."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The lock


def write_lock(workdir: Path, **fields: object) -> Path:
    path = lock_path(workdir)
    holder = {"pid": os.getpid(), "host": HOST, "started": "2030-01-01 00:00:00 UTC",
              "command": "train", "proc_start": None, **fields}
    path.write_text(json.dumps(holder))
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_exclusive_and_removed_with_the_folders_it_made(tmp_path):
    workdir = tmp_path / "new" / "deeper" / "run"
    with workdir_lock(workdir, "train") as lock:
        assert lock.path == tmp_path / "new" / "deeper" / "run.lock"
        holder = json.loads(lock.path.read_text())
        assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), HOST, "train")
        assert not workdir.exists()  # beside the workdir, not in it
        with pytest.raises(WorkdirLocked) as refused:
            WorkdirLock(workdir, "sweep")
        assert str(refused.value) == (
            f"{workdir} is in use by core-jax train (pid {os.getpid()} on {HOST}, started "
            f"{holder['started']}); wait for it to finish (or stop it), or use another --workdir"
        )
    assert not (tmp_path / "new").exists()  # nothing left behind
    with workdir_lock(workdir, "export"):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    pid = dead_pid()
    write_lock(workdir, pid=pid)
    with workdir_lock(workdir, "train") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"core-jax: warning: took over the lock of {workdir} from core-jax train (pid {pid} on "
        f"{HOST}, started 2030-01-01 00:00:00 UTC), which is no longer running\n"
    )
    assert not lock_path(workdir).exists()


def test_lock_of_a_killed_unreaped_or_reused_pid_is_stale(tmp_path, capsys):
    workdir = tmp_path / "run"
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie.send_signal(signal.SIGKILL)
    time.sleep(0.3)  # killed, not waited for: a zombie until reaped
    try:
        write_lock(workdir, pid=zombie.pid)
        with workdir_lock(workdir, "train"):
            pass
    finally:
        zombie.wait()
    # A live pid that belongs to a process started after the lock was written (pid reuse).
    write_lock(workdir, pid=os.getppid(), proc_start=1)
    with workdir_lock(workdir, "train"):
        pass
    assert capsys.readouterr().err.count("which is no longer running") == 2


def test_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    workdir = tmp_path / "run"
    path = write_lock(workdir, host="node-7")  # a live pid, but on "another host"
    with pytest.raises(WorkdirLocked) as refused:
        WorkdirLock(workdir, "train")
    assert str(refused.value) == (
        f"{workdir} is in use by core-jax train (pid {os.getpid()} on node-7, started "
        f"2030-01-01 00:00:00 UTC); if that job is no longer running, delete {path} and run "
        "again"
    )
    path.write_text("garbage")
    with pytest.raises(WorkdirLocked, match=r"does not say by whom \('garbage'\); if no core-jax "
                                            r"command is using .*, delete .* and run again"):
        WorkdirLock(workdir, "train")
    assert path.read_text() == "garbage"  # left as it was


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", -signal.SIGINT)])
def test_lock_is_removed_on_signals(tmp_path, sig, code):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\nfrom core_jax.workdir_lock import workdir_lock\n"
            f"with workdir_lock({str(workdir)!r}, 'train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n"
        )], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert holder.stdout.readline() == "held\n"
    assert lock_path(workdir).exists()
    holder.send_signal(getattr(signal, sig))
    assert holder.wait(timeout=30) == code  # SIGINT: KeyboardInterrupt, after the cleanup
    assert not lock_path(workdir).exists()
    if sig == "SIGTERM":
        assert holder.stderr.read() == "core-jax: terminated (SIGTERM)\n"


def test_multi_host_process_zero_holds_the_lock(tmp_path, monkeypatch):
    from core_jax import workdir_lock as module

    workdir = tmp_path / "run"
    verdicts: list[bool] = []

    def agree(ok: bool) -> bool:  # process 0's verdict, as broadcast_one_to_all gives it
        verdicts.append(ok)
        return verdicts_from_zero

    monkeypatch.setattr(module, "_processes", lambda: (1, 2))
    verdicts_from_zero = True
    with process_zero_lock(workdir, "sweep", agree=agree) as lock:
        assert lock is None and not lock_path(workdir).exists()
    verdicts_from_zero = False
    with pytest.raises(WorkdirLocked, match="process 0 could not lock"), \
            process_zero_lock(workdir, "sweep", agree=agree):
        pass

    monkeypatch.setattr(module, "_processes", lambda: (0, 2))
    verdicts_from_zero = True
    with process_zero_lock(workdir, "sweep", agree=agree) as lock:
        assert lock.path.exists()
    assert not lock_path(workdir).exists()
    write_lock(workdir, host="node-7")
    with pytest.raises(WorkdirLocked, match="node-7"), \
            process_zero_lock(workdir, "sweep", agree=agree):
        pass
    assert verdicts == [False, False, True, False]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core_jax", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=ROOT)


def test_second_writer_refuses_in_one_line_and_touches_nothing(tmp_path):
    """train, sweep, export and benchmark refuse a held workdir before loading anything."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    before = snapshot(workdir)
    config = str(ROOT / "configs/tiny_cat.py")
    with workdir_lock(workdir, "train"):
        holder = json.loads(lock_path(workdir).read_text())
        expected = (
            f"core-jax: {workdir} is in use by core-jax train (pid {os.getpid()} on {HOST}, "
            f"started {holder['started']}); wait for it to finish (or stop it), or use another "
            "--workdir"
        )
        for args in (
            ["train", "--config", config, "--workdir", str(workdir)],
            ["sweep", "--config", str(ROOT / "configs/sweep_tiny.py"), "--workdir", str(workdir)],
            ["export", "--workdir", str(workdir)],
            ["benchmark", "--config", str(ROOT / "configs/toy_benchmark.py"), "--workdir",
             str(workdir)],
        ):
            result = run_cli(*args)
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.splitlines() == [expected], args
        # Exporting elsewhere only reads the workdir: no lock needed (here: nothing to export).
        result = run_cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "out"))
        assert result.stderr.splitlines() == [f"core-jax: {workdir} has no complete checkpoint "
                                              "yet"], result.stderr[-2000:]
    assert snapshot(workdir) == before


# --------------------------------------------------------------------------------------------
# Checkpoint integrity, on RunCheckpoints itself


def state(step: int) -> dict:
    """A small stand-in for a run's items, different at every step."""
    return {"embedding": {"embeds": jnp.arange(8.0).reshape(2, 4) * step,
                          "opt": {"mu": jnp.full((3, 2), 0.5 * step), "count": jnp.int32(step)}}}


def assert_state(restored: dict, step: int) -> None:
    """`restored` holds exactly the numbers saved at `step`."""
    jax.tree.map(np.testing.assert_array_equal, restored, state(step))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    checkpoints = RunCheckpoints(directory, keep=5, stage_ends=[])
    for step in (1, 2, 3):
        checkpoints.save(step, state(step))
    checkpoints.close()
    return directory


def files_of(step_dir: Path) -> list[str]:
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())


# Each kind of file in a step; every file of the newest step belongs to exactly one.
KINDS = {
    "array data": lambda name: "/d/" in name,
    "array metadata": lambda name: name.split("/")[-1] in (
        "_METADATA", "_sharding", "manifest.ocdbt") or "array_metadatas/" in name,
    "checkpoint metadata": lambda name: name.split("/")[-1] in (
        "_CHECKPOINT_METADATA", "commit_success.txt"),
    "manifest": lambda name: name == MANIFEST,
}


def test_every_file_is_in_the_manifest_and_of_one_kind(three_steps):
    for step in (1, 2, 3):
        assert verify_step(three_steps / str(step)) == (True, None)
    names = files_of(three_steps / "3")
    listed = {line.split("  ", 1)[1] for line in
              (three_steps / "3" / MANIFEST).read_text().splitlines()}
    assert listed == set(names) - {MANIFEST}
    for name in names:
        assert sum(kind(name) for kind in KINDS.values()) == 1, name
    if shutil.which("sha256sum"):  # the manifest is sha256sum's format
        check = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=three_steps / "3",
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def restore_newest(directory: Path) -> tuple[tuple[int, dict] | None, list[str]]:
    """restore_newest_intact as the run loop calls it, with the stderr lines it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        checkpoints = RunCheckpoints(directory, keep=5, stage_ends=[])
        try:
            found = checkpoints.restore_newest_intact(state)
        finally:
            checkpoints.close()
    return found, err.getvalue().splitlines()


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_step_is_skipped_with_one_warning(kind, three_steps, tmp_path):
    """Flip a byte in each file of the kind in turn (a fresh copy each time): the run resumes
    from step 2 with the numbers of step 2, says so in one line, keeps step 3 aside as
    `3.damaged`, and saves step 3 anew."""
    names = [n for n in files_of(three_steps / "3") if KINDS[kind](n)]
    assert names
    # The manifest's lines are `<64 hex digits>  <path>\n`: a digit, the separator, the path.
    spots = [0, 64, 66, -1] if kind == "manifest" else [0.5]
    cases = [(name, where) for name in names for where in spots]
    for i, (name, where) in enumerate(cases):
        directory = tmp_path / f"copy{i}"
        shutil.copytree(three_steps, directory)
        path = directory / "3" / name
        flip(path, where if where != -1 else path.stat().st_size - 1)
        found, lines = restore_newest(directory)
        assert found is not None and found[0] == 2, name
        assert_state(found[1], 2)
        ours = [ln for ln in lines if ln.startswith("core-jax")]
        assert len(ours) == 1, lines
        assert re.fullmatch(
            rf"core-jax: warning: checkpoint step 3 in {re.escape(str(directory))} is damaged "
            r"\((\S+ does not match its checksum|\S+ is missing|\S+ is not in SHA256SUMS|"
            r"SHA256SUMS is unreadable)\); resuming from step 2 \(kept as 3\.damaged\)", ours[0]
        ), ours[0]
        assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3.damaged"]
        checkpoints = RunCheckpoints(directory, keep=5, stage_ends=[])
        checkpoints.save(3, state(3))
        checkpoints.close()
        found, lines = restore_newest(directory)
        assert found[0] == 3 and not lines
        assert_state(found[1], 3)


def test_no_intact_step_refuses_in_one_line(three_steps, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    for step in (1, 2, 3):
        flip(directory / str(step) / "embedding" / "_METADATA")
    with pytest.raises(InputError) as refused:
        restore_newest(directory)
    assert str(refused.value) == (
        f"no intact checkpoint in {directory}, every step is damaged (step 3: "
        "embedding/_METADATA does not match its checksum; step 2: embedding/_METADATA does not "
        "match its checksum; step 1: embedding/_METADATA does not match its checksum); delete "
        "that folder to start the run afresh"
    )
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]  # nothing moved
    empty = tmp_path / "empty"
    assert restore_newest(empty) == (None, [])


def test_latest_step_skips_damaged_steps_too(three_steps, tmp_path):
    """The API the current run loop calls (latest_step, then restore) takes the same path."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    flip(directory / "3" / "embedding" / "array_metadatas" / "process_0")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        checkpoints = RunCheckpoints(directory, keep=5, stage_ends=[])
        assert checkpoints.latest_step() == 2
        restored = checkpoints.restore(2, state(0))
        checkpoints.close()
    assert_state(restored, 2)
    assert err.getvalue().count("core-jax: warning: checkpoint step 3") == 1


def test_steps_without_a_manifest_are_tried(three_steps, tmp_path):
    """Steps of an older core-jax (no SHA256SUMS) are accepted when they restore; damaged array
    data fails OCDBT's own checks (CRC-32C, zstd) and is skipped like any damaged step."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    for step in (1, 2, 3):
        (directory / str(step) / MANIFEST).unlink()
    found, lines = restore_newest(directory)
    assert found[0] == 3 and not [ln for ln in lines if ln.startswith("core-jax")]
    for name in files_of(directory / "3"):
        if name.startswith("embedding/d/"):
            flip(directory / "3" / name)
    found, lines = restore_newest(directory)
    assert found[0] == 2
    assert_state(found[1], 2)
    ours = [ln for ln in lines if ln.startswith("core-jax")]
    assert len(ours) == 1 and re.search(r"DATA_LOSS|[Cc]orrupt|checksum", ours[0]), lines


def test_export_and_sample_read_the_newest_intact_step_without_moving_it(three_steps, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir / "checkpoints")
    flip(workdir / "checkpoints" / "3" / "_CHECKPOINT_METADATA")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        step, items = outputs.latest_checkpoint(workdir)
    assert step == 2
    assert_state(items, 2)
    assert [ln for ln in err.getvalue().splitlines() if ln.startswith("core-jax")] == [
        f"core-jax: warning: checkpoint step 3 in {workdir / 'checkpoints'} is damaged "
        "(_CHECKPOINT_METADATA does not match its checksum); using step 2"
    ]
    assert (workdir / "checkpoints" / "3").is_dir()  # read-only: nothing renamed


# --------------------------------------------------------------------------------------------
# Flag parsing: one line, exit 2


BAD_FLAGS = {
    "wrong type": (
        ["--config.stage1.steps=abc"],
        "--config.stage1.steps='abc' is not an int; write a whole number, e.g. "
        "--config.stage1.steps=200",
    ),
    "float wanted": (
        ["--config.stage1.learning_rate=fast"],
        "--config.stage1.learning_rate='fast' is not a float; write a number, e.g. "
        "--config.stage1.learning_rate=0.005",
    ),
    "empty value": (
        ["--config.seed="], "--config.seed='' is not an int; write a whole number, e.g. "
        "--config.seed=0",
    ),
    "bool": (
        ["--overwrite=maybe"],
        "--overwrite='maybe' is not a bool; write --overwrite=true or --overwrite=false",
    ),
    "tuple of other type": (
        ["--config.sample.prompts=3"],
        "--config.sample.prompts='3': 3 is not a str; write a tuple of str, e.g. "
        "--config.sample.prompts=\"('a photo of a {}', 'a {} in the jungle')\"",
    ),
    "unknown flag": (
        ["--workdirr=x"],
        "unknown flag --workdirr for core-jax train (did you mean --workdir?); core-jax train "
        "--help lists its flags",
    ),
    "malformed config key": (
        ["--config.stage1..steps=3"],
        "--config.stage1..steps=3: not a config key; write --config.<section>.<key>=<value>, "
        "e.g. --config.stage1.steps=400",
    ),
    "empty config key": (
        ["--config.=3"],
        "--config.=3: not a config key; write --config.<section>.<key>=<value>, e.g. "
        "--config.stage1.steps=400",
    ),
    "a section given a value": (
        ["--config.stage1=3"],
        "--config.stage1=3: stage1 is a group of settings, not one value; set its keys one at a "
        "time, e.g. --config.stage1.<key>=<value>",
    ),
    "missing value": (
        ["--config.concept.name"],
        "--config.concept.name needs a value: write --config.concept.name=<value>",
    ),
    "misspelt config key": (
        ["--config.stage1.learnin_rate=0.1"],
        "unknown config key 'learnin_rate'; did you mean 'learning_rate'?",
    ),
    "stray argument": (
        ["extra"], "unexpected arguments: extra (flags are written --name=value)",
    ),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_flag_errors_are_one_line_exit_2(case, tmp_path):
    extra, expected = BAD_FLAGS[case]
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", str(ROOT / "configs/tiny_cat.py"), "--workdir",
                     str(workdir), *extra, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"core-jax: {expected}"]
    assert not workdir.exists() and not lock_path(workdir).exists()


def test_config_file_errors_are_one_line_exit_2(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n    return undefined_name\n")
    cases = {
        str(tmp_path / "nope.py"): f"cannot load --config {tmp_path / 'nope.py'}: no such file",
        str(broken): f"cannot load --config {broken}: SyntaxError: invalid syntax ({broken}, "
                     "line 1)",
        str(failing): f"cannot load --config {failing}: NameError: name 'undefined_name' is not "
                      f"defined ({failing}, line 2)",
    }
    for config, expected in cases.items():
        result = run_cli("train", "--config", config, "--workdir", str(tmp_path / "run"),
                         timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.splitlines() == [f"core-jax: {expected}"]
    result = run_cli("train", "--workdir", str(tmp_path / "run"), timeout=120)
    assert result.stderr.splitlines() == [
        "core-jax: core-jax train needs --config; core-jax train --help lists its flags"
    ]
    assert result.returncode == 2


# --------------------------------------------------------------------------------------------
# End to end, in subprocesses: two trains at once; damaged checkpoints of a real run

FAST = {
    "model.preset": "micro", "data.resolution": 16, "data.num_views": 4, "stage1.steps": 6,
    "stage1.batch_size": 2, "stage1.rescale_start": 2, "stage1.rescale_end": 4,
    "stage2.steps": 4, "stage2.batch_size": 2, "sample.steps": 2, "sample.images_per_prompt": 1,
    "sample.prompts": ("a {} in the snow",), "log_every": 1, "checkpoint_every": 1,
    "keep_checkpoints": 20,
}
TOTAL = 10


def train_command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "core_jax", "train", "--config",
            str(ROOT / "configs/tiny_cat.py"), "--workdir", str(workdir),
            *(f"--config.{key}={value}" for key, value in FAST.items()), *extra]


def train(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(workdir, *extra), capture_output=True, text=True,
                          env=ENV, timeout=600, cwd=ROOT)


def assert_same_result(workdir: Path, reference: Path) -> None:
    embeds = [load_file(w / "learned_embeds.safetensors")["<s*>"] for w in (workdir, reference)]
    np.testing.assert_array_equal(*embeds)
    unet = "unet/diffusion_pytorch_model.safetensors"
    expected = load_file(reference / unet)
    for key, value in load_file(workdir / unet).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_two_trains_on_one_workdir_one_trains_one_refuses(reference_run, tmp_path):
    workdir = tmp_path / "run"
    logs = [(tmp_path / f"{i}.out").open("w+") for i in range(2)]
    runs = [subprocess.Popen(train_command(workdir), stdout=log, stderr=subprocess.PIPE,
                             text=True, env=ENV, cwd=ROOT) for log in logs]
    errs = [run.communicate(timeout=600)[1] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], errs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = errs[loser].splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"core-jax: {re.escape(str(workdir))} is in use by core-jax train \(pid "
        rf"{runs[winner].pid} on {re.escape(HOST)}, started [^)]+\); wait for it to finish "
        r"\(or stop it\), or use another --workdir", lines[0]), lines
    assert_same_result(workdir, reference_run)
    assert not lock_path(workdir).exists()


@pytest.mark.slow
def test_damaged_checkpoints_resume_to_the_uninterrupted_result(reference_run, tmp_path):
    """A run stopped three times; each time bytes are flipped in one kind of file of the newest
    checkpoint: all array data files of step 3, the array metadata of step 6, the checkpoint's
    own metadata of step 8 (stage 2). Each rerun warns once, resumes from the step before and
    the last ends equal to a run never interrupted. Then every step is damaged: one line,
    exit 2."""
    workdir = tmp_path / "run"
    ckpt = workdir / "checkpoints"

    def damage(step: int, kind: str) -> None:
        names = [n for n in files_of(ckpt / str(step)) if KINDS[kind](n)]
        if kind == "array metadata":
            names = [n for n in names if n.endswith(("_METADATA", "process_0"))]
        if kind == "checkpoint metadata":
            names = ["_CHECKPOINT_METADATA"]
        for name in names:
            flip(ckpt / str(step) / name)

    def resumed(result: subprocess.CompletedProcess, bad: int) -> None:
        assert result.returncode == 0, result.stderr[-3000:]
        ours = [ln for ln in result.stderr.splitlines() if ln.startswith("core-jax")]
        assert len(ours) == 1 and re.fullmatch(
            rf"core-jax: warning: checkpoint step {bad} in {re.escape(str(ckpt))} is damaged "
            rf"\(.+\); resuming from step {bad - 1} \(kept as {bad}\.damaged\)", ours[0]
        ), ours
        assert f"resumed {workdir} at step {bad - 1} of {TOTAL}" in result.stdout

    damaged = None
    for stop, kind in ((3, "array data"), (6, "array metadata"), (8, "checkpoint metadata")):
        result = train(workdir, f"--stop_at_step={stop}")
        if damaged is None:
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            resumed(result, damaged)
        damage(stop, kind)
        damaged = stop
    result = train(workdir)
    resumed(result, 8)
    assert_same_result(workdir, reference_run)
    steps = [json.loads(ln)["step"] for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL + 1))
    # export reads the newest checkpoint through the same verification (and takes the lock).
    exported = run_cli("export", "--workdir", str(workdir))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert not [ln for ln in exported.stderr.splitlines() if ln.startswith("core-jax")]
    np.testing.assert_array_equal(
        *(load_file(w / "learned_embeds.safetensors")["<s*>"] for w in (workdir / "export",
                                                                      workdir))
    )

    # A finished run is not trained again (its result.json says it is done): the run is made
    # one killed before its end, so the rerun has to read its checkpoints.
    (workdir / "result.json").unlink()
    for step in sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()):
        flip(ckpt / str(step) / "state" / "_METADATA")
    result = train(workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(rf"core-jax: no intact checkpoint in {re.escape(str(ckpt))}, every step "
                        r"is damaged \(step 10: .*; step 9: .*; step 8: .*; and 7 older steps\); "
                        r"delete that folder to start the run afresh",
                        last), last


# --------------------------------------------------------------------------------------------
# Noise

HIDE_TORCH = '''
import importlib.util, sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(name)
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name == "torch" or name.startswith("torch.") else _find_spec(name, package)
sys.meta_path.insert(0, _Hide())
importlib.util.find_spec = find_spec
'''


def test_no_pytorch_line_without_torch(tmp_path):
    """On a JAX-only install transformers logs 'PyTorch was not found...' when imported;
    core_jax filters that line (and only that line)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_TORCH)  # this interpreter, without torch
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}

    def stderr_of(code: str) -> str:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "PyTorch was not found" in stderr_of("import transformers")  # torch is hidden
    assert stderr_of("import core_jax.text; from transformers import CLIPTokenizer") == ""


def test_license_is_an_spdx_string():
    """setuptools >= 77 reads `license` as an SPDX expression; the older table form prints a
    deprecation banner on every install."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]


MULTI_HOST = '''
import os, sys
import jax
from jax.experimental import multihost_utils
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from core_jax.workdir_lock import WorkdirLocked, process_zero_lock
try:
    with process_zero_lock(sys.argv[3], "sweep") as lock:
        print("held" if lock else "not the holder", flush=True)
        multihost_utils.sync_global_devices("done")
except WorkdirLocked as err:
    print(f"refused: {err}", flush=True)
'''


@pytest.mark.slow
def test_multi_host_lock_with_two_jax_processes(tmp_path):
    """Two processes joined by jax.distributed: process 0 holds the lock, process 1 not; with
    the workdir held elsewhere, both stop."""
    workdir = tmp_path / "run"

    def both() -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        runs = [subprocess.Popen([sys.executable, "-c", MULTI_HOST, address, str(i),
                                  str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=ENV, cwd=ROOT) for i in range(2)]
        # The last line: gloo prints its connections on stdout.
        return [run.communicate(timeout=300)[0].strip().splitlines()[-1] for run in runs]

    assert both() == ["held", "not the holder"]
    assert not lock_path(workdir).exists()
    write_lock(workdir, host="node-7")
    zero, one = both()
    assert zero.startswith(f"refused: {workdir} is in use by core-jax train (pid ")
    assert one == f"refused: process 0 could not lock {workdir}; see its output"

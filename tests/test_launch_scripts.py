"""The launch scripts' logic on CPU: tcmalloc's install step never fails the set-up and says in
one line what it did; launch/gpu_check.sh parses and prints the commands it would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_jax import _runtime

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash scripts")


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_tcmalloc_step_never_fails_and_says_one_line(tmp_path, uid):
    """As root it asks apt-get for libtcmalloc-minimal4 (here a stub that fails); as a user it
    only says how. Either way: exit 0, one line."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "apt-calls"
    _stub(stubs, "id", f"echo {uid}")
    _stub(stubs, "apt-get", f'echo "$@" >> {calls}; exit 100')
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "launch/install_tcmalloc.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if _runtime.find_library("tcmalloc"):  # installed here: nothing to do, nothing said
        assert proc.stdout == "" and not calls.exists()
        return
    assert len(proc.stdout.strip().splitlines()) == 1
    if uid == "0":
        asked = calls.read_text()
        assert "install" in asked and "libtcmalloc-minimal4" in asked
        assert "could not install" in proc.stdout
    else:
        assert not calls.exists()
        assert "apt-get install libtcmalloc-minimal4" in proc.stdout


def test_setup_script_calls_the_tcmalloc_step():
    setup = (ROOT / "launch/setup.sh").read_text()
    assert "launch/install_tcmalloc.sh" in setup
    for script in ("setup.sh", "install_tcmalloc.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], check=True)


def _gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=3600)


def test_gpu_check_prints_its_commands(tmp_path):
    subprocess.run(["bash", "-n", str(ROOT / "launch/gpu_check.sh")], check=True)
    proc = _gpu_check("--dry-run", env={"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    first, *commands = proc.stdout.strip().splitlines()
    assert first == f"would write {tmp_path}/gpu_check.json"
    named = dict(line.split(": ", 1) for line in commands)
    assert list(named) == ["bf16_suite", "bf16_scaling", "fp32_suite"]
    for name, command in named.items():
        assert "bench --config configs/bench_sd15.py --json" in command
        assert f"--config.dtype={'bfloat16' if name.startswith('bf16') else 'float32'}" in command
    for name in ("bf16_suite", "fp32_suite"):
        assert "--variants ti,core,unet,sample --config.batch=6" in named[name]
    assert "--scaling --config.scaling.concepts=1,4,8" in named["bf16_scaling"]
    proc = _gpu_check("--dry-run", "--out", str(tmp_path / "x.json"), "--steps=2")
    assert proc.stdout.startswith(f"would write {tmp_path}/x.json")
    assert "--config.steps=2" in proc.stdout
    for bad in (["--frobnicate"], ["--steps", "many"], ["--config", "configs/nope.py"]):
        proc = _gpu_check("--dry-run", *bad)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, bad
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CORE_JAX_TEST_GPU_CHECK"),
                    reason="10-25 min on 2 cores; set CORE_JAX_TEST_GPU_CHECK=1 to run")
def test_gpu_check_runs_end_to_end_on_the_tiny_preset(tmp_path):
    """The whole script on CPU with bench_tiny and one timed step: every part's results land
    in the one JSON file, and the goals are judged from them (MFU blank: a CPU has no peak).
    Opt-in: it compiles a dozen bench programs, which would add a quarter to CI's time."""
    out = tmp_path / "check.json"
    proc = _gpu_check("--config", "configs/bench_tiny.py", "--steps", "1", "--out", str(out),
                      "--budget", "3000",  # a shared CPU compiles slowly; nothing may be cut
                      env={"PYTHON": sys.executable, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    parts = {p["name"]: p for p in report["parts"]}
    assert all(p["exit_code"] == 0 for p in parts.values()), report
    for name in ("bf16_suite", "fp32_suite"):
        variants = [(r["variant"], r["dtype"]) for r in parts[name]["results"]]
        dtype = "bfloat16" if name.startswith("bf16") else "float32"
        assert variants == [(v, dtype) for v in ("ti", "core", "unet", "sample")]
    assert [r["concepts"] for r in parts["bf16_scaling"]["results"]] == [1, 4, 8]
    goals = report["goals"]
    assert goals["core_bf16_mfu"] is None and goals["core_bf16_mfu_at_least_0.40"] is None
    assert goals["per_concept_ratio_c8"] > 0 and goals["core_bf16_300_steps_s"] > 0

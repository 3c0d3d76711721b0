"""The persistent compilation cache (on by default, reported) and `--profile N` traces.

Processes are separate on purpose: a cache hit means a later process read what an earlier one
wrote. No time is asserted alone; the second process's compile seconds are compared with the
first's as a ratio (a cache read takes milliseconds where XLA takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core_jax import compile_cache
from core_jax.errors import InputError
from core_jax.train.profile import StepProfiler

ROOT = Path(__file__).resolve().parents[1]
# The test session points JAX at one shared cache through the environment; these processes
# must start from their own.
_CLEAN_ENV = {k: v for k, v in os.environ.items()
              if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                   compile_cache.CACHE_ENV))}


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir("") == tmp_path / "xdg" / "core-jax" / "xla"
    # Several processes: the workdir every host sees (JAX writes from process 0 only).
    assert compile_cache.resolve_cache_dir("", tmp_path / "w", processes=4) == (
        tmp_path / "w" / ".jax_cache")
    assert compile_cache.resolve_cache_dir("none") is None
    assert compile_cache.resolve_cache_dir("OFF") is None
    assert compile_cache.resolve_cache_dir("~/x") == Path.home() / "x"
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir("") == tmp_path / "env"
    assert compile_cache.resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"


_PROGRAM = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from core_jax.compile_cache import CompileRecord, enable_compile_cache
    enable_compile_cache(sys.argv[1])
    record = CompileRecord()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
    f(jnp.ones((32, 32))).block_until_ready()
    print(json.dumps(record.summary()))
""")


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", _PROGRAM, str(cache)], env=_CLEAN_ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    first, second = run(), run()
    assert first["cache_misses"] > 0 and first["cache_hits"] == 0
    assert second["cache_hits"] == first["cache_misses"] and second["cache_misses"] == 0
    assert first["cache_dir"] == second["cache_dir"] == str(cache)
    # "none" turns it off: nothing is looked up.
    proc = subprocess.run([sys.executable, "-c", _PROGRAM, "none"], env=_CLEAN_ENV,
                          capture_output=True, text=True, timeout=300)
    off = json.loads(proc.stdout.splitlines()[-1])
    assert off["cache_hits"] == off["cache_misses"] == 0 and off["cache_dir"] is None


def test_profile_traces_the_steps_after_the_first(tmp_path):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((16, 16))
    profiler = StepProfiler(tmp_path / "profile", steps=2)
    for _ in range(4):
        f(x).block_until_ready()
        profiler.step_done()
        assert profiler.tracing == (profiler.finished in (1, 2))
    profiler.close()
    assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    nothing = StepProfiler(tmp_path / "none", steps=0)
    nothing.step_done()
    nothing.close()
    assert not (tmp_path / "none").exists()
    with pytest.raises(InputError, match="--profile is -1"):
        StepProfiler(tmp_path, steps=-1)


_TINY_TRAIN = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=3", "--config.stage1.batch_size=2", "--config.stage1.rescale_start=1",
    "--config.stage1.rescale_end=2", "--config.stage2.steps=0", "--config.sample.at_end=False",
    "--config.log_every=1", "--config.checkpoint_every=3",
]


@pytest.mark.slow
def test_second_train_process_hits_the_cache_and_compiles_faster(tmp_path):
    """Two `core-jax train` processes, fresh workdirs, one cache: the second loads every
    program; the second also traces 2 steps with --profile."""
    cache = tmp_path / "cache"

    def train(workdir: Path, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "core_jax", "train", "--config",
               str(ROOT / "configs/tiny_cat.py"), "--workdir", str(workdir),
               f"--compile_cache={cache}", *_TINY_TRAIN, *extra]
        proc = subprocess.run(cmd, env={**_CLEAN_ENV, "XLA_FLAGS": ""}, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("compile: "))
        print(line)
        numbers = re.search(r"(\d+) programs, ([\d.]+) s in XLA .*: (\d+) hits, (\d+) misses",
                            line)
        assert numbers, line
        programs, seconds, hits, misses = numbers.groups()
        return dict(programs=int(programs), compile_s=float(seconds), hits=int(hits),
                    misses=int(misses))

    first = train(tmp_path / "first")
    second = train(tmp_path / "second", "--profile=2")
    assert first["misses"] > 0
    assert second["hits"] >= first["misses"] and second["misses"] == 0
    assert second["compile_s"] < 0.5 * first["compile_s"]
    assert list((tmp_path / "second" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert not (tmp_path / "first" / "profile").exists()

"""JAX's persistent compilation cache, on by default, and what compiling cost a command.

A restarted sweep (a preempted pod, a rerun after a fix) or a second `core-jax train` of the same
model and settings compiles the same programs again: minutes on an accelerator for an SD-sized
step. With the cache the second process loads each executable from disk instead.

Where the cache lives (`--compile_cache`, or the environment variable `CORE_JAX_COMPILE_CACHE`):

- default, one process: `$XDG_CACHE_HOME/core-jax/xla` (`~/.cache/core-jax/xla`), per user. Not
  the workdir: every `core-jax train` of a new concept starts a new workdir with the same
  programs, and the bench has no workdir at all. Sharing is safe: JAX's cache key holds the
  program, the compile options and flags, the JAX/jaxlib versions and the devices.
- default, several processes (pods, SLURM): `<workdir>/.jax_cache`. JAX writes entries from
  process 0 only, so every host must read the one directory it writes: the workdir is already
  on storage every host sees.
- `none` (or `off`): no persistent cache.
- `JAX_COMPILATION_CACHE_DIR` set in the environment and no `--compile_cache`: left as JAX reads
  it (the tests point their subprocesses at one shared cache this way).

Every program is cached whatever its compile time or size (a 50 ms compile read back in 5 ms is
worth keeping) unless `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise.

`CompileRecord` counts, through `jax.monitoring`, the cache hits and misses and the seconds spent
in XLA compiling (or loading from the cache) since it was made; `line()` is the one line a
command prints.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
from jax import monitoring

CACHE_ENV = "CORE_JAX_COMPILE_CACHE"
OFF = ("none", "off")
# Event names of jax 0.10 (jax/_src/compiler.py, dispatch.py).
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # XLA compile, or cache read
_TRACE = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration")


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/core-jax/xla`, `~/.cache/core-jax/xla` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "core-jax" / "xla"


def resolve_cache_dir(
    setting: str | None, workdir: str | Path | None = None, processes: int = 1
) -> Path | None:
    """The directory `setting` names (see the module docstring), or None for no cache. An empty
    or None setting falls back to `CORE_JAX_COMPILE_CACHE`, then to the defaults."""
    value = (setting or os.environ.get(CACHE_ENV, "")).strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    if processes > 1 and workdir is not None:
        return Path(workdir) / ".jax_cache"
    return user_cache_dir()


def active_cache_dir() -> Path | None:
    """The directory JAX's persistent cache uses in this process, or None when it is off."""
    directory = jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache or not directory:
        return None
    return Path(directory)


def enable_compile_cache(
    setting: str | None, workdir: str | Path | None = None, processes: int = 1
) -> Path | None:
    """Point JAX's persistent compilation cache at the directory `setting` resolves to, before
    the first compile; returns that directory (None: the cache is off). An environment's
    `JAX_COMPILATION_CACHE_DIR` stays in force when neither the setting nor
    `CORE_JAX_COMPILE_CACHE` is given."""
    given = (setting or os.environ.get(CACHE_ENV, "")).strip()
    env_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not given and env_dir:
        return Path(env_dir)
    directory = resolve_cache_dir(given, workdir, processes)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only home must not stop a run: it compiles as before
        print(f"core-jax: warning: no compilation cache ({directory}: {err.strerror}); "
              "give a writable --compile_cache DIR or 'none'", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no size floor and no file-system specific override of it.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


class _Totals:
    """Process-wide sums of the compile events (jax.monitoring listeners cannot be removed, so
    one set is registered, on first use, and records read differences)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        self.compile_s = self.trace_s = 0.0
        self.programs = 0
        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, name: str, **kwargs: Any) -> None:
        with self.lock:
            if name == _HIT:
                self.hits += 1
            elif name == _MISS:
                self.misses += 1

    def _duration(self, name: str, seconds: float, **kwargs: Any) -> None:
        with self.lock:
            if name == _BACKEND_COMPILE:
                self.compile_s += seconds
                self.programs += 1
            elif name in _TRACE:
                self.trace_s += seconds

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(programs=self.programs, compile_s=self.compile_s, trace_s=self.trace_s,
                        cache_hits=self.hits, cache_misses=self.misses)


_totals: _Totals | None = None
_totals_lock = threading.Lock()


def _process_totals() -> _Totals:
    global _totals
    with _totals_lock:
        if _totals is None:
            _totals = _Totals()
        return _totals


@dataclasses.dataclass
class CompileRecord:
    """What compiling cost since this record was made: XLA compiles (or cache reads) and their
    seconds, tracing + lowering seconds, persistent-cache hits and misses."""

    cache_dir: Path | None = dataclasses.field(default_factory=active_cache_dir)
    _start: dict[str, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._start = _process_totals().snapshot()

    def summary(self) -> dict[str, Any]:
        now = _process_totals().snapshot()
        delta = {key: now[key] - self._start[key] for key in now}
        return {
            "programs": int(delta["programs"]),
            "compile_s": round(delta["compile_s"], 3),
            "trace_s": round(delta["trace_s"], 3),
            "cache_hits": int(delta["cache_hits"]),
            "cache_misses": int(delta["cache_misses"]),
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
        }

    def line(self) -> str:
        s = self.summary()
        cache = (f"cache {s['cache_dir']}: {s['cache_hits']} hits, {s['cache_misses']} misses"
                 if s["cache_dir"] else "no persistent cache")
        return (f"compile: {s['programs']} programs, {s['compile_s']:.1f} s in XLA "
                f"(+ {s['trace_s']:.1f} s tracing); {cache}")

"""Process setup that must happen before JAX starts: a malloc that suits XLA:CPU.

With glibc's malloc, XLA:CPU maps, zero-fills and unmaps its large temporary buffer on every
execution (glibc returns big blocks to the kernel as soon as they are freed). On the bench-small
stage-1 step that cost a third of the step time. tcmalloc (Debian/Ubuntu package
`libtcmalloc-minimal4`) and jemalloc (with retention on) keep the memory mapped; failing both,
glibc tunables that stop it from using mmap and trimming do most of the same.

`configure_process()` runs first in `core-jax`'s `main()`: on Linux, unless the backend is
clearly an accelerator, it re-executes the process once with the allocator preloaded (or the
tunables set; glibc reads both only at start-up). `CORE_JAX_ALLOCATOR` chooses:
`auto` (default: tcmalloc, else jemalloc, else glibc tunables), `tcmalloc`, `jemalloc`,
`tunables`, or `system` (leave the process alone).

Processes that do not start through the CLI (pytest, notebooks, launch scripts) get the same
setting from `eval "$(python -m core_jax._runtime)"`, which prints the shell exports.
"""

from __future__ import annotations

import ctypes.util
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ALLOCATOR_ENV = "CORE_JAX_ALLOCATOR"
# Set in the re-executed child (to what was applied), so it never re-executes again.
APPLIED_ENV = "CORE_JAX_ALLOCATOR_APPLIED"
CHOICES = ("auto", "tcmalloc", "jemalloc", "tunables", "system")

# Where Debian/Ubuntu (x86-64 and arm64), Fedora and Alpine put the libraries.
_LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
    "/usr/local/lib",
)
_LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
# jemalloc must be told to keep freed pages; tcmalloc keeps them by default.
_JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# No mmap for large blocks, no trimming, one arena: freed memory stays mapped and reused.
_GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
)
_MALLOCS_IN_PRELOAD = ("tcmalloc", "jemalloc", "mimalloc")


def find_library(kind: str) -> str | None:
    """Absolute path of the tcmalloc or jemalloc shared library, if installed."""
    for name in _LIBRARIES[kind]:
        for directory in _LIB_DIRS:
            path = Path(directory) / name
            if path.exists():
                return str(path)
    stem = _LIBRARIES[kind][0].split(".so")[0].removeprefix("lib")
    return ctypes.util.find_library(stem)


def _accelerator_expected(env: Mapping[str, str]) -> bool:
    """True when JAX will most likely run on a GPU or TPU (the allocator matters little there,
    and TPU images preload their own)."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return not platforms.startswith("cpu")
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0"))


def allocator_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """The variables to add for a better allocator, or None if nothing should change."""
    choice = env.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ALLOCATOR_ENV} must be one of {CHOICES}, got {choice!r}")
    if choice == "system" or env.get(APPLIED_ENV) or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        if _accelerator_expected(env):
            return None
        if any(name in env.get("LD_PRELOAD", "") for name in _MALLOCS_IN_PRELOAD):
            return None  # the user already chose one
    for kind in ("tcmalloc", "jemalloc"):
        if choice not in ("auto", kind):
            continue
        path = find_library(kind)
        if path:
            preload = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
            extra = {"LD_PRELOAD": preload, APPLIED_ENV: f"{kind}:{path}"}
            if kind == "jemalloc" and "MALLOC_CONF" not in env:
                extra["MALLOC_CONF"] = _JEMALLOC_CONF
            return extra
        if choice == kind:
            print(f"core-jax: {ALLOCATOR_ENV}={kind} but no {kind} library was found",
                  file=sys.stderr)
            return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return None  # the user tuned malloc already
    joined = f"{tunables}:{_GLIBC_TUNABLES}" if tunables else _GLIBC_TUNABLES
    return {"GLIBC_TUNABLES": joined, APPLIED_ENV: "glibc-tunables"}


def configure_process(argv: Sequence[str] | None) -> None:
    """Re-execute this process once with a better allocator (see the module docstring).

    `argv` is what the CLI's `main()` received: None means the process was started as a command
    and may be replaced; a list means an in-process call (tests, notebooks), left alone.
    """
    if argv is not None:
        return
    extra = allocator_environment(os.environ)
    if extra is None:
        return
    env = {**os.environ, **extra}
    # orig_argv keeps `-m core_jax` and interpreter options; argv[0] may be a bare name.
    args = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError as err:  # keep going with the system allocator rather than fail
        print(f"core-jax: could not re-execute with {extra[APPLIED_ENV]}: {err}", file=sys.stderr)


def allocator_in_use() -> str:
    """What serves malloc in this process: the preloaded library, glibc with the tunables, or
    plain glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in _MALLOCS_IN_PRELOAD:
        if f"lib{name}" in maps:
            return name
    if "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc (tunables: no mmap, no trim)"
    return "glibc"


def shell_exports(env: Mapping[str, str]) -> str:
    """`export NAME=value` lines for `allocator_environment(env)` (empty if nothing changes)."""
    extra = allocator_environment(env) or {}
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in extra.items())


if __name__ == "__main__":
    print(shell_exports(os.environ))

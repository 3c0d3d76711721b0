"""The `--compile_cache` flag of the commands that compile (train, sweep, bench, sample,
dreambench)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from absl import flags

if TYPE_CHECKING:  # imported when used: it imports JAX, which --help need not wait for
    from core_jax.compile_cache import CompileRecord

_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", "", "persistent compilation cache directory, or 'none' (default: "
    "$CORE_JAX_COMPILE_CACHE, else ~/.cache/core-jax/xla; <workdir>/.jax_cache for several "
    "processes)"
)


def start_compile_cache(workdir: str | Path | None = None) -> CompileRecord:
    """Turn the cache on as the flag says (after jax.distributed joined, if it does) and start
    recording what compiling costs from here."""
    import jax

    from core_jax.compile_cache import CompileRecord, enable_compile_cache

    enable_compile_cache(_COMPILE_CACHE.value, workdir, jax.process_count())
    return CompileRecord()

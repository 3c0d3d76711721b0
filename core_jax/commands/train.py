"""core-jax train --config configs/<name>.py --workdir DIR [--config.x.y=value ...]
[--profile N] [--compile_cache DIR|none]"""

from __future__ import annotations

from typing import Any

from absl import flags
from ml_collections import config_flags

from core_jax.commands.compile_cache_flag import start_compile_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, samples and exports go")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "start afresh in a workdir of another run")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "checkpoint and exit when this global step is reached (resume later)"
)
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "trace this many steps (after the first) into WORKDIR/profile for "
    "TensorBoard's profile plugin"
)
flags.mark_flags_as_required(["config", "workdir"])


def _train(*args: Any, **kwargs: Any) -> Any:
    # Imported here, inside the error reporting: the import takes seconds (JAX, transformers)
    # and a Ctrl-C during it is reported like one during set-up.
    from core_jax.train.loop import train

    return train(*args, **kwargs)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    compiling = start_compile_cache(_WORKDIR.value)
    run_reporting_input_errors(
        under_workdir_lock, _WORKDIR.value, "train", _train, _CONFIG.value, _WORKDIR.value,
        overwrite=_OVERWRITE.value, stop_at_step=_STOP_AT.value, profile_steps=_PROFILE.value,
    )
    print(compiling.line())

"""core-jax export --workdir DIR [--out DIR]: exports from the run's newest checkpoint."""

from __future__ import annotations

from pathlib import Path

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a core-jax train workdir")
_OUT = flags.DEFINE_string("out", None, "output folder (default: WORKDIR/export)")
flags.mark_flags_as_required(["workdir"])


def _export(workdir: Path, out: Path | None) -> list[Path]:
    from core_jax.train.outputs import export_run  # JAX: seconds, after the lock

    return export_run(workdir, out)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors, under_workdir_lock

    workdir, out = Path(_WORKDIR.value), Path(_OUT.value) if _OUT.value else None
    if out is None or out.resolve().is_relative_to(workdir.resolve()):
        # Writing into the workdir: not while a run writes it.
        written = run_reporting_input_errors(
            under_workdir_lock, workdir, "export", _export, workdir, out
        )
    else:  # only reads the workdir
        written = run_reporting_input_errors(_export, workdir, out)
    for path in written:
        print(f"wrote {path}")

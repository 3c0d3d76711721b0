"""A train workdir: refuse what would lose or mix up work (a file, another config's run,
checkpoints an earlier version wrote, an overwrite that would delete inputs), then prepare it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections

from core_jax.config import migrate
from core_jax.errors import InputError
from core_jax.files import atomic_write_bytes
from core_jax.train.stages import stage_names

# Config keys a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "keep_checkpoints", "sample.")


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"stage1": {"steps": 3}} -> {"stage1.steps": 3}: configs compared key by key."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def saved_config(path: Path) -> dict[str, Any]:
    """A saved config.json, migrated to today's keys (`core_jax.config.migrate`)."""
    try:
        return migrate(json.loads(path.read_text()))
    except ValueError as err:
        raise InputError(f"cannot read {path} ({err}); --overwrite starts afresh") from err


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuse, before anything is written: a workdir that is a file, one that holds a run of a
    different config (unless told to overwrite), one whose checkpoints an earlier version wrote,
    and an overwrite that would delete a folder that is not a core-jax run or that holds the
    run's own photos or model."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file, not a folder")
    saved = workdir / "config.json"
    if overwrite:
        if workdir.is_dir() and any(workdir.iterdir()) and not saved.is_file():
            raise InputError(
                f"--overwrite would delete {workdir}, which is not a core-jax run (no "
                "config.json); choose another --workdir"
            )
        # Only what exists on disk can be deleted ("builtin:chelsea" names no file).
        inputs = [Path(p).resolve() for p in (config.model.path, config.concept.images) if p]
        for path in (p for p in inputs if p.exists()):
            if path.is_relative_to(workdir.resolve()):
                raise InputError(
                    f"--overwrite would delete {path}, an input of this run inside {workdir}"
                )
        return
    if not saved.is_file():
        return
    before = flatten_config(saved_config(saved))  # one line if unreadable
    now = flatten_config(json.loads(config.to_json()))
    last_steps = f"{stage_names(config)[-1]}.steps"
    changed = sorted(
        k for k in before.keys() | now.keys()
        if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES)
        and k != last_steps
    )
    if changed:
        raise InputError(
            f"{workdir} holds a run with a different config (differs in {', '.join(changed)});"
            " use a new --workdir, or --overwrite to start this one afresh"
        )
    if "version" not in json.loads(saved.read_text()) and (workdir / "checkpoints").is_dir():
        raise InputError(
            f"{workdir} holds checkpoints of an earlier core-jax (config version 1), which this "
            "one cannot resume; its exports still load. Rerun with --overwrite to train it "
            "again (the same config gives the same run)"
        )


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Create the workdir (emptied first under `overwrite`) and write config.json atomically.
    Call `check_workdir` first."""
    if overwrite and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(workdir / "config.json",
                              lambda: config.to_json(indent=2).encode())

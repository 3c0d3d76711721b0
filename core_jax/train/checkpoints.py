"""Orbax checkpoints of a run: the last K plus the end of each stage, written asynchronously,
each step sealed with a checksum manifest and verified before it is resumed from.

A checkpoint holds named items: `embedding` (stage-1 state) always, `unet` (stage-2 state) once
stage 2 has begun. Steps are global: stage-2 step s is saved as stage1.steps + s.

A run may be killed at any moment, also while a checkpoint is written. Orbax writes a step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every file is in place;
steps are found by the name `<step>` alone, so a killed write is never read back, and the
manager deletes such leftovers when it opens the folder (`tests/test_robustness.py` checks both).

A step's files may also be damaged after they were written (a disk, a copy, a sync tool).
OCDBT checksums cover the array data, nothing covers the rest (tree and array metadata, the
step's own metadata), so every step carries `SHA256SUMS` (the format of `sha256sum`, so
`sha256sum -c SHA256SUMS` checks one by hand). It is written in Orbax's background thread
before the rename, so it covers every array and metadata file and is part of the atomic rename;
the two files Orbax writes at the rename itself (`_CHECKPOINT_METADATA`, `commit_success.txt`)
are added at the next save or at `close()` (a run killed in between leaves those two unlisted:
they are then not checked). Reading a step back verifies every file against it (`verify_step`);
a step without a manifest (written by an older core-jax) is accepted if a trial restore reads
it. Hashing costs about a second per GB: in the background when writing, before the restore
when reading.

`restore_newest_intact` walks the steps newest first, warns in one line about each damaged step
it skips, sets it aside as `<step>.damaged` (kept, never read again) and resumes from the newest
intact one; when every step is damaged it refuses in one line. `latest_step` does the same with
the checksums alone. docs/robustness.md lists the lines; tests/test_workdir_safety.py damages
each kind of file.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from core_jax.errors import InputError

MANIFEST = "SHA256SUMS"
# Written (or rewritten) by Orbax when it renames the step into place, after our manifest.
AFTER_COMMIT = ("_CHECKPOINT_METADATA", "commit_success.txt")
_LINE = re.compile(r"([0-9a-f]{64})  (\S.*)")
T = TypeVar("T")


def checkpoint_items(directory: Path, step: int) -> list[str]:
    """Names of the items saved at `step` (their sub-folders; Orbax's own files start with _)."""
    step_dir = Path(directory) / str(step)
    return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and not p.name.startswith("_"))


# --------------------------------------------------------------------------------------------
# The manifest


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _step_files(step_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
        if p.is_file() and not p.name.startswith(MANIFEST)
    )


def _write_manifest(step_dir: Path, entries: dict[str, str]) -> None:
    tmp = step_dir / f"{MANIFEST}.tmp"
    with tmp.open("w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(step_dir / MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """`SHA256SUMS` of every file now in `step_dir`."""
    _write_manifest(step_dir, {name: _digest(step_dir / name) for name in _step_files(step_dir)})


def read_manifest(step_dir: Path) -> dict[str, str] | None:
    """{relative path: sha256} of the step's manifest; None if it has none. Raises ValueError
    for a manifest that is not one well-formed line per file."""
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    entries = {}
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        match = _LINE.fullmatch(line)
        if not match or match[2] in entries:
            raise ValueError(f"{MANIFEST} is unreadable")
        entries[match[2]] = match[1]
    if not entries:
        raise ValueError(f"{MANIFEST} is empty")
    return entries


def seal_manifest(step_dir: Path) -> None:
    """Add the files Orbax wrote at the rename to a manifest written before it (hashing only
    those: the rest keeps the checksums taken when the step was written)."""
    try:
        entries = read_manifest(step_dir)
    except ValueError:
        return  # damaged already; verify_step will say so
    if entries is None or all(name in entries for name in AFTER_COMMIT):
        return
    for name in AFTER_COMMIT:
        if (step_dir / name).is_file():
            entries[name] = _digest(step_dir / name)
    _write_manifest(step_dir, entries)


def verify_step(step_dir: Path) -> tuple[bool, str | None]:
    """(verified, reason): (True, None) when every file matches the manifest, (False, None) when
    the step has no manifest (nothing to check it against), (_, reason) when it is damaged."""
    try:
        entries = read_manifest(step_dir)
    except (OSError, ValueError) as err:
        return True, str(err) if isinstance(err, ValueError) else f"{MANIFEST}: {err}"
    if entries is None:
        return False, None
    for name, expected in entries.items():
        path = step_dir / name
        if not path.is_file():
            return True, f"{name} is missing"
        try:
            if _digest(path) != expected:
                return True, f"{name} does not match its checksum"
        except OSError as err:
            return True, f"{name}: {err.strerror or err}"
    unlisted = [n for n in _step_files(step_dir) if n not in entries and n not in AFTER_COMMIT]
    if unlisted:
        return True, f"{unlisted[0]} is not in {MANIFEST}"
    return True, None


# --------------------------------------------------------------------------------------------
# Newest intact step


def _short(err: BaseException) -> str:
    """One line of an error for a warning: its first line without tensorstore's spec and source
    locations; when long, its code and its end (where tensorstore says what failed)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"\s*\[(tensorstore_spec[^=]*|source locations)='.*?'\]", "", text).strip()
    if len(text) <= 160:
        return text
    code = re.match(r"[A-Z_]+: ", text)
    return (code[0] if code else "") + "..." + text[-120:]


def _everyone_agrees(ok: bool) -> bool:
    """Multi-host: a step is used only if it read back in every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _set_aside(directory: Path, step: int) -> Path:
    """Rename a damaged step to `<step>.damaged` (`.damaged-2`, ... if taken): kept for
    inspection, never read or overwritten again."""
    target = directory / f"{step}.damaged"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{step}.damaged-{n}"
    (directory / str(step)).rename(target)
    return target


def newest_intact(
    directory: Path,
    steps: list[int],
    attempt: Callable[[int], T],
    *,
    set_aside: bool,
    verb: str = "resuming from",
) -> tuple[int, T] | None:
    """Walk `steps` newest first: verify each step's files, then `attempt(step)` (a restore).
    Returns (step, attempt's result) for the newest step that passes both, after one warning
    line per damaged newer step (renamed `<step>.damaged` when `set_aside`); None when there are
    no steps; InputError when none is intact.

    A step whose manifest verified is judged by it alone: if `attempt` fails there, the files
    are as they were written and the error (a shape mismatch, a bug) is raised as it is. A step
    without a manifest is damaged if `attempt` fails."""
    damaged: list[tuple[int, str]] = []
    primary = jax.process_index() == 0
    for step in sorted(steps, reverse=True):
        verified, reason = verify_step(directory / str(step))
        result = None
        if reason is None:
            try:
                result = attempt(step)
            except Exception as err:
                if verified:
                    raise
                reason = _short(err)
            if not verified and not _everyone_agrees(reason is None):
                reason = reason or "could not be read in every process"
        if reason is None:
            for bad, why in damaged:
                kept = ""
                if set_aside:
                    if primary:
                        kept = f" (kept as {_set_aside(directory, bad).name})"
                    else:
                        kept = f" (kept as {bad}.damaged)"
                if primary:
                    print(f"core-jax: warning: checkpoint step {bad} in {directory} is damaged "
                          f"({why}); {verb} step {step}{kept}", file=sys.stderr, flush=True)
            if set_aside and damaged and jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("core_jax_checkpoints_set_aside")
            return step, result
        damaged.append((step, reason))
    if not damaged:
        return None
    which = "; ".join(f"step {s}: {why}" for s, why in damaged[:3])
    if len(damaged) > 3:
        which += f"; and {len(damaged) - 3} older steps"
    raise InputError(
        f"no intact checkpoint in {directory}, every step is damaged ({which}); delete that "
        "folder to start the run afresh"
    )


# --------------------------------------------------------------------------------------------
# A run's checkpoints


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, stage_ends: list[int]):
        self.directory = Path(directory).absolute()
        self._saving: int | None = None  # the step in Orbax's background thread
        self._unsealed: list[int] = []  # renamed into place, manifest not yet complete
        self._intact: dict[int, bool] = {}  # steps verified in this process
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(keep), policies.CustomSteps(stage_ends)]
            ),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
            async_options=ocp.AsyncOptions(post_finalization_callback=self._before_commit),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _before_commit(self) -> None:
        """Orbax's background thread, process 0, every process's files written, before the
        rename: the manifest becomes part of the step."""
        step = self._saving
        if step is None:
            return
        found = [p for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*") if p.is_dir()]
        if not found and (self.directory / str(step)).is_dir():
            found = [self.directory / str(step)]  # an Orbax that renames before the callback
        if len(found) != 1:
            return  # not a layout we know: the step stays without a manifest (tried on restore)
        write_manifest(found[0])
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Complete the manifests of the steps renamed into place since the last call."""
        while self._unsealed:
            step_dir = self.directory / str(self._unsealed.pop())
            if step_dir.is_dir():
                seal_manifest(step_dir)

    def _newest(self, attempt: Callable[[int], T]) -> tuple[int, T] | None:
        try:
            found = newest_intact(
                self.directory, list(self.manager.all_steps()), attempt,
                set_aside=True, verb="resuming from",
            )
        except InputError:
            self.close()  # the run ends here: Orbax's threads must not outlive the interpreter
            raise
        if found is not None:
            self._intact[found[0]] = True
            if found[0] != self.manager.latest_step():
                self.manager.reload()  # damaged newer steps were renamed away
        return found

    def latest_step(self) -> int | None:
        """The newest step whose files match their checksums (a step without a manifest is
        taken as it is; `restore_newest_intact` also tries it). Damaged newer steps are set
        aside with a warning line; InputError when every step is damaged."""
        self.manager.wait_until_finished()
        self._seal()
        found = self._newest(lambda step: None)
        return None if found is None else found[0]

    def restore_newest_intact(
        self, like: Callable[[int], dict[str, Any]]
    ) -> tuple[int, dict[str, Any]] | None:
        """(step, items restored shaped like `like(step)`) of the newest intact step, after one
        warning line per damaged newer step (each set aside as `<step>.damaged`); None when
        there is no checkpoint; InputError (one line) when there are some but none is intact."""
        self.manager.wait_until_finished()
        self._seal()
        return self._newest(lambda step: self._restore(step, like(step)))

    def items(self, step: int) -> list[str]:
        return checkpoint_items(self.manager.directory, step)

    def save(self, step: int, items: dict[str, Any]) -> None:
        """Save `items` at `step` (once: a step saved already is left as it is)."""
        if step in self.manager.all_steps():
            return
        self.manager.wait_until_finished()  # the previous step is renamed into place
        self._seal()
        self._saving = step
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def _restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        abstract = {
            name: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree) for name, tree in like.items()
        }
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in like}

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """Restore the named items shaped (and sharded) like the given trees. A step that fails
        its checksums, or without any that cannot be read, is an InputError (one line)."""
        if not self._intact.get(step):
            verified, reason = verify_step(self.directory / str(step))
            if reason is not None:
                self.close()
                raise InputError(
                    f"checkpoint step {step} in {self.directory} is damaged ({reason})"
                )
            if not verified:
                try:
                    return self._restore(step, like)
                except Exception as err:
                    self.close()
                    raise InputError(
                        f"checkpoint step {step} in {self.directory} cannot be read "
                        f"({_short(err)})"
                    ) from err
        return self._restore(step, like)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._seal()
        self.manager.close()

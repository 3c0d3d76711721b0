"""One writer per workdir: the commands that write a workdir (`train`, `sweep`, `benchmark`,
`export` into it) hold its lock while they run; a second one refuses in one line naming the
holder, before it has loaded or written anything. Reading commands (`sample`) take no lock.

The lock is a file beside the workdir, `<workdir>.lock` (beside, not inside: `--overwrite`
deletes the workdir, and a file inside would make a new workdir look non-empty). It holds the
holder's pid, host, start time and command as JSON, and is created whole and atomically (a
hard link of a complete temporary file; `O_EXCL` where links are not supported). It is removed
when the command ends: normally, with an error, on Ctrl-C, on SIGTERM (the training loop turns
SIGTERM/SIGINT into a checkpoint and a normal return; outside the loop SIGTERM ends the command
through Python's exit path). A SIGKILL leaves it behind: a lock whose process is gone (same
host; pid not running, a zombie, or reused by a process that started later) is taken over with
a warning line. A lock from another host cannot be checked; the refusal says which file to
delete once the user knows that job is dead. Multi-host: process 0 holds the lock, and every
process stops if it could not (`process_zero_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core_jax.errors import InputError


class WorkdirLocked(InputError):
    """Another core-jax command holds the workdir (or its lock file cannot be understood)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str
    proc_start: int | None = None  # Linux: the process's start time (clock ticks since boot)

    def describe(self) -> str:
        return (f"core-jax {self.command} (pid {self.pid} on {self.host}, started "
                f"{self.started})")


def lock_path(workdir: str | Path) -> Path:
    """`<workdir>.lock`, beside the workdir (symlinks resolved: one lock per real folder)."""
    path = Path(workdir).expanduser().resolve()
    if not path.name:  # the file-system root
        return path / ".core-jax.lock"
    return path.with_name(f"{path.name}.lock")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _alive(holder: Holder) -> bool:
    """Whether the holder's process still runs on this host."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(holder.pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    return holder.proc_start is None or started == holder.proc_start


def _read(path: Path) -> tuple[str, Holder | None] | None:
    """(raw text, holder) of a lock file; holder None if it cannot be parsed; None if the file
    is gone."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"<{err.strerror}>", None
    try:
        fields = json.loads(raw)
        holder = Holder(**{f.name: fields[f.name] for f in dataclasses.fields(Holder)
                           if f.name in fields})
        int(holder.pid)
        return raw, holder
    except (ValueError, TypeError, KeyError):
        return raw, None


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text`, atomically; False if it exists."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network and FUSE file systems)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (removed again on release if left empty)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


class WorkdirLock:
    """A held lock; `release()` removes the file if it is still ours."""

    def __init__(self, workdir: str | Path, command: str):
        self.workdir = Path(workdir)
        self.path = lock_path(workdir)
        self.created = _make_parents(self.path.parent)
        try:
            self.text = self._acquire(command)
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self, command: str) -> str:
        pid = os.getpid()
        stat = _proc_stat(pid)
        me = Holder(pid, socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command,
                    stat[1] if stat else None)
        text = json.dumps(dataclasses.asdict(me))
        taken_over: Holder | None = None
        unreadable_since: float | None = None
        for _ in range(100):
            if _create(self.path, text):
                if taken_over is not None:
                    print(f"core-jax: warning: took over the lock of {self.workdir} from "
                          f"{taken_over.describe()}, which is no longer running",
                          file=sys.stderr, flush=True)
                return text
            found = _read(self.path)
            if found is None:
                continue  # released meanwhile
            raw, holder = found
            if holder is None:
                # Only the O_EXCL fallback shows a half-written file, for a moment.
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < 1.0:
                    time.sleep(0.05)
                    continue
                raise WorkdirLocked(
                    f"{self.workdir} is locked by {self.path}, which does not say by whom "
                    f"({raw[:60]!r}); if no core-jax command is using {self.workdir}, delete "
                    f"{self.path} and run again"
                )
            if holder.host != me.host:
                raise WorkdirLocked(
                    f"{self.workdir} is in use by {holder.describe()}; if that job is no "
                    f"longer running, delete {self.path} and run again"
                )
            if _alive(holder):
                raise WorkdirLocked(
                    f"{self.workdir} is in use by {holder.describe()}; wait for it to finish "
                    "(or stop it), or use another --workdir"
                )
            if self._break(raw):
                taken_over = holder
        raise WorkdirLocked(f"could not take the lock {self.path}: other processes keep "
                            "taking and releasing it")

    def _break(self, stale: str) -> bool:
        """Remove a stale lock, unless another process replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_text() == stale:
                return True
            # A live lock taken just now: put it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _remove_created(self) -> None:
        for folder in self.created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break

    def release(self) -> None:
        found = _read(self.path)
        if found is not None and found[0] == self.text:
            self.path.unlink(missing_ok=True)
        self._remove_created()


def _sigterm(signum: int, frame: Any) -> None:
    print("core-jax: terminated (SIGTERM)", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, command: str) -> Iterator[WorkdirLock]:
    """Hold `workdir`'s lock for the block; WorkdirLocked (an InputError: one line, exit 2) if
    another live command holds it. While held, SIGTERM ends the process through Python's exit
    path (so the lock is removed) unless a training loop has its own handler in place."""
    lock = WorkdirLock(workdir, command)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield lock
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def _processes() -> tuple[int, int]:
    """(this process's index, process count) of a multi-process JAX run; (0, 1) otherwise,
    without importing JAX or starting its backends."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def _broadcast_from_zero(ok: bool) -> bool:
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def process_zero_lock(
    workdir: str | Path, command: str, *, agree: Callable[[bool], bool] = _broadcast_from_zero
) -> Iterator[WorkdirLock | None]:
    """Multi-host: process 0 holds the lock; every process learns whether it could (`agree`:
    process 0's verdict, broadcast) and they stop together if not. A single process is
    `workdir_lock`."""
    index, count = _processes()
    if count == 1:
        with workdir_lock(workdir, command) as lock:
            yield lock
        return
    if index != 0:
        if not agree(False):
            raise WorkdirLocked(f"process 0 could not lock {workdir}; see its output")
        yield None
        return
    context = workdir_lock(workdir, command)
    try:
        lock = context.__enter__()
    except BaseException:
        agree(False)  # the others stop too rather than wait for process 0
        raise
    with contextlib.ExitStack() as stack:
        stack.push(context)  # released however the block ends
        if not agree(True):
            raise WorkdirLocked(f"processes disagree about the lock of {workdir}")
        yield lock

"""Writing files so that a reader, a crash or a second writer never sees half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def temp_sibling(path: Path, kind: str) -> Path:
    # Same folder, so os.replace is a rename on one file system; a hidden, unique name so
    # concurrent writers and directory scanners (webui, ComfyUI) never pick it up.
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path: Path, data: bytes | Callable[[], bytes]) -> None:
    """Write `data` (or what `data()` returns) to `path` via a temporary file and a rename:
    readers see the old file or the whole new one, never a part; no residue on failure. Every
    output of core-jax is written through here."""
    tmp = temp_sibling(Path(path), "tmp")
    try:
        with open(tmp, "xb") as f:  # plain open (not mkstemp) so the file gets the umask's mode
            f.write(data() if callable(data) else data)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""One module per `core-jax` command; each defines its absl flags and `main(argv)`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from core_jax.errors import InputError, NonFiniteError

_PACKAGE = Path(__file__).resolve().parents[1]


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None, *, fallback: Callable[..., None],
) -> None:
    """Our own warnings (a skipped photo, a truncated prompt) as one `core-jax: warning:` line;
    other libraries' warnings as Python shows them."""
    if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"core-jax: warning: {message}", file=file or sys.stderr)
    else:
        fallback(message, category, filename, lineno, file, line)


def run_reporting_input_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Bad input ends the command with its one-line message and exit code 2, a run that went
    non-finite with exit code 3, Ctrl-C outside the training loop with 130; no traceback for
    any of them."""
    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.showwarning = lambda *a, **k: _show_warning(*a, **k, fallback=previous)
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            print(f"core-jax: {err}", file=sys.stderr)
            sys.exit(2)
        except NonFiniteError as err:
            print(f"core-jax: {err}", file=sys.stderr)
            sys.exit(3)
        except KeyboardInterrupt:
            print("core-jax: interrupted", file=sys.stderr)
            sys.exit(130)


def under_workdir_lock(
    workdir: str | Path, command: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)` holding the workdir's lock (`core_jax.workdir_lock`); taken before
    anything is loaded or written, so a second writer refuses at once and touches nothing.
    Multi-host: process 0 holds it."""
    from core_jax.workdir_lock import process_zero_lock

    with process_zero_lock(workdir, command):
        return fn(*args, **kwargs)

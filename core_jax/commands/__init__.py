"""One module per `core-jax` command; each defines its absl flags and `main(argv)`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from core_jax.errors import InputError, NonFiniteError


def run_reporting_input_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Bad input ends the command with its one-line message and exit code 2, a run that went
    non-finite with exit code 3; no traceback for either."""
    try:
        return fn(*args, **kwargs)
    except InputError as err:
        print(f"core-jax: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"core-jax: {err}", file=sys.stderr)
        sys.exit(3)

"""Model configs <-> the JSON dicts diffusers/transformers write."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_json_dict(cls: type[T], config: dict[str, Any]) -> T:
    """Build the dataclass from the keys it knows; lists become tuples (configs are hashable)."""
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in config.items() if k in names}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


def to_json_dict(config: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }

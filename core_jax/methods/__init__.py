"""The registered methods. A method is one small module of this package (see `base.Method`)
that defines `METHODS`, a tuple of the methods it provides; every such module is registered
when the package is imported, so adding a method touches its module and its config only. A
stage's config lists the methods it combines, e.g. `stage1.methods = ("textual_inversion",
"core")`.

`core-jax methods` prints this registry. Code outside the package (a test, a user's script) adds
a method with `register` before building a run.
"""

from __future__ import annotations

import importlib
import pkgutil

from core_jax.errors import InputError
from core_jax.methods.base import Hook, Method, Numbers, Settings, Term

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available to stage configs by its name (a later one replaces an earlier)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _module in pkgutil.iter_modules(__path__):
    for _method in getattr(importlib.import_module(f"{__name__}.{_module.name}"), "METHODS", ()):
        register(_method)

__all__ = ["METHODS", "Hook", "Method", "Numbers", "Settings", "Term", "get_method", "register"]

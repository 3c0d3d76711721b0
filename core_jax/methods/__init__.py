"""The registered methods. A method is one small module of this package (see `base.Method`)
that defines `METHODS`, a tuple of the methods it provides; every such module is registered
when the package is imported, so adding a method touches its module and its config only. A
stage's config lists the methods it combines, e.g. `stage1.methods = ("textual_inversion",
"core")`.

`core-jax methods` prints this registry. Code outside the package (a test, a user's script) adds
a method with `register` before building a run.

A method's parameter groups (`Method.groups`) are found by name with `group_of`: a run's params
name their groups, and a stage that merely carries a group (trained by an earlier stage) still
uses it the way its method defined.
"""

from __future__ import annotations

import importlib
import pkgutil

from core_jax.errors import InputError
from core_jax.methods.base import Hook, Method, Numbers, ParamGroup, Settings, Term, UNetCall

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available to stage configs by its name (a later one replaces an earlier).
    A parameter group has one definition: another method defining it differently is refused."""
    for other in METHODS.values():
        if other.name == method.name:
            continue
        for name, group in method.groups.items():
            if other.groups.get(name, group) is not group:
                raise ValueError(f"method {method.name!r} redefines parameter group {name!r} "
                                 f"of {other.name!r}; train that group instead of redefining it")
    METHODS[method.name] = method
    return method


def group_of(name: str) -> ParamGroup:
    """The definition of parameter group `name`, from whichever method defines it."""
    for method in METHODS.values():
        if name in method.groups:
            return method.groups[name]
    known = sorted({g for m in METHODS.values() for g in m.groups})
    raise InputError(f"no method defines the parameter group {name!r}; known: {', '.join(known)}")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _module in pkgutil.iter_modules(__path__):
    for _method in getattr(importlib.import_module(f"{__name__}.{_module.name}"), "METHODS", ()):
        register(_method)

__all__ = [
    "METHODS", "Hook", "Method", "Numbers", "ParamGroup", "Settings", "Term", "get_method",
    "UNetCall", "group_of", "register",
]

"""The registered methods. A method is one small module (see `base.Method`); a stage's config
lists the ones it combines, e.g. `stage1.methods = ("textual_inversion", "core")`.

`core-jax methods` prints this registry. Code outside the package (a test, a user's script) adds
a method with `register` before building a run.
"""

from __future__ import annotations

from core_jax.errors import InputError
from core_jax.methods import core, textual_inversion, thesis, unet_finetune
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


for _method in (
    textual_inversion.METHOD, core.METHOD, thesis.PAIRWISE, thesis.HINGE, unet_finetune.METHOD
):
    register(_method)

__all__ = ["METHODS", "Hook", "Method", "Numbers", "Settings", "Term", "get_method", "register"]

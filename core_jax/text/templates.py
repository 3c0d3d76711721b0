"""Context templates for CoRe's regularization prompts ("a {} in the snow")."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from core_jax.errors import InputError

BUILTIN_TEMPLATE_SETS = ("animate", "inanimate")
# In a caption or sample prompt, stands for the concept's super-category word: DreamBooth trains
# on "a photo of a {} {cls}" ("a photo of a S* dog"), each concept of a sweep with its own word.
CLASS_FIELD = "{cls}"


def check_template(template: str) -> None:
    """Raise InputError unless the template holds exactly one "{}" and no other brace."""
    if template.count("{}") != 1:
        raise InputError(f"template {template!r} must contain exactly one '{{}}'")
    if template.count("{") != 1 or template.count("}") != 1:
        raise InputError(f"template {template!r} has a brace besides its one '{{}}'")


def fill_template(template: str, text: str) -> str:
    """The template with its "{}" replaced by text (str.format would choke on other braces)."""
    check_template(template)
    return template.replace("{}", text)


def check_prompt(prompt: str) -> None:
    """`check_template` for a caption or sample prompt, which may also name the class."""
    if CLASS_FIELD not in prompt:
        check_template(prompt)
        return
    try:
        check_template(prompt.replace(CLASS_FIELD, "cls"))
    except InputError:
        raise InputError(f"prompt {prompt!r} must contain exactly one '{{}}' (for S*) and no "
                         f"brace besides it and '{CLASS_FIELD}' (the class word)") from None


def fill_prompt(prompt: str, text: str, super_category: str) -> str:
    """A caption or sample prompt with "{}" replaced by text and "{cls}" by the word."""
    check_prompt(prompt)
    return prompt.replace(CLASS_FIELD, super_category).replace("{}", text)


def _parse(text: str, source: str) -> list[str]:
    templates = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            check_template(line)
        except InputError as e:
            raise InputError(f"{source}:{lineno}: {e}") from None
        templates.append(line)
    if not templates:
        raise InputError(f"{source}: no templates (every line is blank or a '#' comment)")
    return templates


def load_templates(kind_or_path: str | os.PathLike) -> list[str]:
    """Templates from a built-in set ("animate", "inanimate") or a text file, one per line.

    Blank lines and lines starting with "#" are skipped; every other line must contain exactly
    one "{}", the slot for the concept word.
    """
    if str(kind_or_path) in BUILTIN_TEMPLATE_SETS:
        name = f"{kind_or_path}.txt"
        res = importlib.resources.files(__package__).joinpath("templates", name)
        return _parse(res.read_text(encoding="utf-8"), f"templates/{name}")
    path = Path(kind_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{kind_or_path!s} is neither a built-in template set "
            f"{BUILTIN_TEMPLATE_SETS} nor a file"
        )
    return _parse(path.read_text(encoding="utf-8"), str(path))

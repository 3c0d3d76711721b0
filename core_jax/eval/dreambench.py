"""The DreamBench protocol file: google/dreambooth's `dataset/prompts_and_classes.txt`.

Its layout: a "Classes" heading, a `subject_name,class` table (30 rows), then "Prompts",
"Object Prompts" and "Live Subject Prompts" headings, each prompt heading followed by a
`prompt_list = [ ... ]` block of lines such as
`'a {0} {1} in the jungle'.format(unique_token, class_token),`. The blocks are Python, but are
read here as syntax trees, never run: each item must be a string literal, optionally with
`.format(unique_token, class_token)`, so a file cannot make this reader execute anything.
Live subjects (the dogs and cats, per the dataset's README) get the live prompts.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from core_jax.errors import InputError

LIVE_CLASSES = frozenset({"cat", "dog"})
# The live prompts that change the subject's outfit or accessories: what the CoRe paper leaves
# out of CLIP-I and DINO ("stylization / outfit change"; its exact list is not published).
OUTFIT_PROMPTS = (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
)
_FORMAT_ARGS = ("unique_token", "class_token")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """`classes`: subject -> class word, in the file's order. The prompt lists are templates
    with `{0}` for the unique token and `{1}` for the class word."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts(self, subject: str) -> tuple[str, ...]:
        return self.live_prompts if self.is_live(subject) else self.object_prompts


def fill(template: str, unique_token: str, class_token: str) -> str:
    """A template as the file's `.format(unique_token, class_token)` would fill it."""
    return template.format(unique_token, class_token)


def _template(node: ast.expr, where: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str) and not node.keywords
        and tuple(getattr(a, "id", None) for a in node.args) == _FORMAT_ARGS
    ):
        return node.func.value.value
    raise InputError(f"{where}: a prompt must be a string, optionally "
                     f"'...'.format(unique_token, class_token); got {ast.unparse(node)!r}")


def _prompt_list(lines: list[str], start: int, where: str) -> tuple[tuple[str, ...], int]:
    """The `prompt_list = [...]` block at or after line `start`: its templates and the index
    of the line after it."""
    first = next((i for i in range(start, len(lines)) if lines[i].strip()), None)
    if first is None or not re.match(r"\s*prompt_list\s*=\s*\[", lines[first]):
        raise InputError(f"{where}: expected 'prompt_list = [' after the heading")
    end = next((i for i in range(first, len(lines)) if lines[i].strip() == "]"), None)
    if end is None:
        raise InputError(f"{where}: the prompt_list starting on line {first + 1} has no ']' line")
    source = "\n".join(lines[first : end + 1])
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as err:
        raise InputError(f"{where}: the prompt_list on lines {first + 1}-{end + 1} is not "
                         f"a Python list ({err.msg})") from err
    statement = tree.body[0] if len(tree.body) == 1 else None
    if not (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.List)):
        raise InputError(f"{where}: line {first + 1} is not 'prompt_list = [...]'")
    templates = tuple(_template(item, where) for item in statement.value.elts)
    for template in templates:
        if "{0}" not in template:
            raise InputError(f"{where}: prompt {template!r} has no {{0}} for the unique token")
    return templates, end + 1


def read_protocol(path: str | Path) -> Protocol:
    """Parse `prompts_and_classes.txt` (the subject table and both prompt lists)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise InputError(f"cannot read the DreamBench protocol {path}: {err}") from err
    where = str(path)
    stripped = [line.strip() for line in lines]
    try:
        header = stripped.index("subject_name,class")
    except ValueError:
        raise InputError(f"{where}: no 'subject_name,class' table header") from None
    classes: dict[str, str] = {}
    i = header + 1
    while i < len(lines) and stripped[i]:
        subject, comma, class_word = stripped[i].partition(",")
        if not comma or not subject or not class_word.strip():
            raise InputError(f"{where}, line {i + 1}: expected 'subject,class', got "
                             f"{stripped[i]!r}")
        classes[subject.strip()] = class_word.strip()
        i += 1
    lists = {}
    for heading in ("Object Prompts", "Live Subject Prompts"):
        try:
            at = stripped.index(heading, i)
        except ValueError:
            raise InputError(f"{where}: no {heading!r} heading after the table") from None
        lists[heading], i = _prompt_list(lines, at + 1, f"{where} ({heading})")
    if not classes:
        raise InputError(f"{where}: the subject table is empty")
    return Protocol(classes, lists["Object Prompts"], lists["Live Subject Prompts"])

"""CoRe's regularization prompt pairs with their context tokens aligned.

A template ("a {} in the snow") is filled once with the placeholder text (y*, V tokens) and once
with the super-category word (y_cat, K tokens; K may differ from V). The context tokens are every
position from start-of-text up to and including the first end-of-text, except the concept span;
padding never counts. Context slot s is the s-th context token: obj_index[s] is its position in
y*, cat_index[s] its position in y_cat. Gathering the encoder outputs of y* and y_cat with these
indices gives [T, D] arrays whose masked slots hold the same context token.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
from transformers import CLIPTokenizer

from core_jax.errors import InputError
from core_jax.text.templates import fill_template
from core_jax.text.tokenizer import encode_full, pad_id, super_category_ids, truncate
from core_jax.text.vocab import MODEL_MAX_LENGTH


@dataclasses.dataclass(frozen=True)
class RegularizationPrompts:
    """N templates' prompt pairs; every array is [N, max_length].

    For each slot with ``context_mask`` set, position ``obj_index`` of ``obj_ids`` (y*) and
    position ``cat_index`` of ``cat_ids`` (y_cat) hold the same context token. Unused slots
    have index 0 and mask False.
    """

    templates: tuple[str, ...]
    placeholder_text: str
    super_category: str
    obj_ids: np.ndarray  # int32, padded with the tokenizer's pad id
    cat_ids: np.ndarray  # int32
    obj_index: np.ndarray  # int32
    cat_index: np.ndarray  # int32
    context_mask: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.templates)


def _find_span(ids: list[int], span: list[int], template: str) -> int:
    v = len(span)
    starts = [k for k in range(len(ids) - v + 1) if ids[k : k + v] == span]
    if len(starts) != 1:
        raise InputError(
            f"template {template!r}: the placeholder tokens {span} occur {len(starts)} times "
            "in the filled prompt, expected exactly once"
        )
    return starts[0]


def _context_pairs(obj: list[int], cat: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """(position in y*, position in y_cat) of each context token, untruncated.

    Context before the concept is the common prefix, after it the common suffix. Comparing
    tokens (not template pieces tokenized apart) drops a token that BPE fuses with the concept
    word, e.g. the "s" of "a {}s", instead of misaligning everything after it.
    """
    p = 0
    while p < start and p < len(cat) and obj[p] == cat[p]:
        p += 1
    s = 0
    # The super-category keeps at least one token of y_cat between the two context runs.
    while s < len(obj) - end and s < len(cat) - p - 1 and obj[-1 - s] == cat[-1 - s]:
        s += 1
    prefix = [(i, i) for i in range(p)]
    suffix = [(len(obj) - s + k, len(cat) - s + k) for k in range(s)]
    return prefix + suffix


def regularization_prompts(
    tokenizer: CLIPTokenizer,
    templates: str | Sequence[str],
    placeholder_text: str,
    super_category: str,
    max_length: int = MODEL_MAX_LENGTH,
) -> RegularizationPrompts:
    """Fill each template with the placeholder text and the super-category; align contexts.

    ``placeholder_text`` is what ``placeholder_string`` gives ("<s*> <s*>_1"); its tokens must
    occur exactly once in each filled prompt. A prompt longer than max_length is truncated
    (end-of-text kept) with a warning; then only context tokens present in both prompts count,
    plus the two end-of-text tokens.
    """
    if isinstance(templates, str):
        templates = [templates]
    templates = tuple(templates)
    if not templates:
        raise ValueError("no templates given")
    concept = tokenizer.encode(placeholder_text, add_special_tokens=False)
    if not concept:
        raise ValueError(f"placeholder text {placeholder_text!r} gives no tokens")
    super_category_ids(tokenizer, super_category)  # refuses a word with no tokens

    n = len(templates)
    texts = [fill_template(t, placeholder_text) for t in templates]
    texts += [fill_template(t, super_category) for t in templates]
    encoded = encode_full(tokenizer, texts)
    eos = tokenizer.eos_token_id

    ids = np.full((2, n, max_length), pad_id(tokenizer), dtype=np.int32)
    index = np.zeros((2, n, max_length), dtype=np.int32)
    mask = np.zeros((n, max_length), dtype=bool)
    for row, template in enumerate(templates):
        obj, cat = encoded[row], encoded[n + row]
        start = _find_span(obj, concept, template)
        pairs = _context_pairs(obj, cat, start, start + len(concept))
        if max(len(obj), len(cat)) > max_length:
            warnings.warn(
                f"template {template!r}: prompt of {len(obj)} (y*) / {len(cat)} (y_cat) tokens "
                f"truncated to {max_length}; context beyond it is not regularized",
                stacklevel=2,
            )
            obj, cat = truncate(obj, max_length, eos), truncate(cat, max_length, eos)
        eos_obj, eos_cat = obj.index(eos), cat.index(eos)
        if start + len(concept) > eos_obj:
            raise InputError(
                f"template {template!r}: the placeholder lies beyond the first end-of-text "
                f"(position {eos_obj}) of the prompt; shorten the template"
            )
        pairs = [(i, j) for i, j in pairs if i < eos_obj and j < eos_cat]
        pairs.append((eos_obj, eos_cat))
        ids[0, row, : len(obj)] = obj
        ids[1, row, : len(cat)] = cat
        index[:, row, : len(pairs)] = np.asarray(pairs, dtype=np.int32).T
        mask[row, : len(pairs)] = True
    return RegularizationPrompts(
        templates=templates,
        placeholder_text=placeholder_text,
        super_category=super_category,
        obj_ids=ids[0],
        cat_ids=ids[1],
        obj_index=index[0],
        cat_index=index[1],
        context_mask=mask,
    )

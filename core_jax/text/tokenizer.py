"""CLIP tokenizer, placeholder tokens and fixed-length prompt ids.

Learned vectors live outside the text encoder's table (DESIGN.md, performance principle 1): the
placeholder tokens get ids at or beyond the table size, and the encoder swaps in the learned
vectors at those positions. Every concept of a multi-concept run shares the same placeholder
ids; a batch row's concept id picks whose vectors fill them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from core_jax.errors import InputError
from core_jax.text.templates import fill_prompt
from core_jax.text.vocab import MODEL_MAX_LENGTH, clip_tokenizer_dir


def load_tokenizer(
    folder: str | os.PathLike | None = None, subfolder: str = "tokenizer"
) -> CLIPTokenizer:
    """CLIP tokenizer: SD 1.x's, built offline, or the one in a diffusers model folder.

    ``folder`` may be a diffusers model folder (its ``subfolder`` is used: ``tokenizer/``, or
    SDXL's ``tokenizer_2/``) or a tokenizer folder itself. Its settings are kept as they are
    (SD 2.x and SDXL's second tokenizer pad with "!", id 0).
    """
    if folder is None:
        return CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    folder = Path(folder)
    for candidate in (folder / subfolder, folder):
        if (candidate / "vocab.json").is_file() or (candidate / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(candidate)
    raise FileNotFoundError(
        f"no tokenizer in {folder}: expected {folder / subfolder}/vocab.json "
        f"or {folder}/vocab.json"
    )


def placeholder_tokens(placeholder: str = "<s*>", num_vectors: int = 1) -> list[str]:
    """Token strings for a V-vector placeholder: "<s*>", "<s*>_1", ... (diffusers' naming)."""
    if num_vectors < 1:
        raise InputError(f"num_vectors must be >= 1, got {num_vectors}")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def placeholder_string(placeholder: str = "<s*>", num_vectors: int = 1) -> str:
    """The text that stands for the concept in a prompt: "<s*> <s*>_1 ..."."""
    return " ".join(placeholder_tokens(placeholder, num_vectors))


def add_placeholder_tokens(
    tokenizer: CLIPTokenizer, placeholder: str = "<s*>", num_vectors: int = 1
) -> list[int]:
    """Add the V placeholder tokens to the tokenizer (in place) and return their ids.

    Refuses a string that is already a token, or that the tokenizer already reads as one
    existing token (e.g. "dog"): the placeholder would hijack that word in every prompt,
    super-category prompts included.
    """
    if not placeholder or any(c.isspace() for c in placeholder):
        raise InputError(f"placeholder {placeholder!r} must be non-empty and without whitespace")
    names = placeholder_tokens(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    for name in names:
        if name in vocab:
            raise InputError(
                f"placeholder token {name!r} is already in the tokenizer's vocabulary "
                f"(id {vocab[name]}); choose another placeholder string"
            )
        ids = tokenizer.encode(name, add_special_tokens=False)
        if len(ids) == 1:
            raise InputError(
                f"placeholder token {name!r} already tokenizes as the existing token "
                f"{tokenizer.convert_ids_to_tokens(ids)[0]!r} (id {ids[0]}); adding it would "
                "change the meaning of that word, choose e.g. '<name>'"
            )
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise ValueError(f"tokenizer added {added} of the placeholder tokens {names}")
    return [int(i) for i in tokenizer.convert_tokens_to_ids(names)]


def encode_full(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids with start/end-of-text, neither truncated nor padded."""
    # verbose=False: over-long prompts are reported by our own warning, naming the prompt.
    return tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]


def truncate(ids: list[int], max_length: int, eos_id: int) -> list[int]:
    """Cut to max_length keeping end-of-text last, as transformers' truncation does."""
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [eos_id]


def pad_id(tokenizer: CLIPTokenizer) -> int:
    """The padding id: end-of-text for SD 1.x, "!" (0) for SD 2.x; end-of-text if unset."""
    pid = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pid is None else pid


def tokenize(
    tokenizer: CLIPTokenizer, prompts: str | Sequence[str], max_length: int = MODEL_MAX_LENGTH
) -> np.ndarray:
    """Prompts -> int32 ids [B, max_length], padded with the tokenizer's pad token.

    Prompts longer than max_length are truncated (end-of-text kept) with a warning.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = np.full((len(prompts), max_length), pad_id(tokenizer), dtype=np.int32)
    for row, (prompt, ids) in enumerate(zip(prompts, encode_full(tokenizer, prompts), strict=True)):
        if len(ids) > max_length:
            warnings.warn(
                f"prompt {prompt!r} is {len(ids)} tokens, truncated to {max_length}",
                stacklevel=2,
            )
            ids = truncate(ids, max_length, tokenizer.eos_token_id)
        out[row, : len(ids)] = ids
    return out


def super_category_ids(tokenizer: CLIPTokenizer, word: str) -> list[int]:
    """Token ids of a super-category word, without start/end-of-text (may be several)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise InputError(f"super-category {word!r} gives no tokens; give a word such as 'dog'")
    return [int(i) for i in ids]


def caption_ids(
    tokenizer: CLIPTokenizer,
    placeholder_text: str,
    template: str = "a photo of a {}",
    max_length: int = MODEL_MAX_LENGTH,
    super_category: str = "",
) -> np.ndarray:
    """Ids [max_length] of the training caption, e.g. "a photo of a <s*>" (or, with "{cls}" in
    the template, "a photo of a <s*> dog" for super_category "dog")."""
    return tokenize(tokenizer, [fill_prompt(template, placeholder_text, super_category)],
                    max_length)[0]

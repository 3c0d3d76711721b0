"""The CLIP BPE vocabulary, rebuilt offline from the merges shipped with this package.

CLIP's recipe: the 256 byte symbols, the same 256 with ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``. That gives 49408 tokens, byte-identical to the
``vocab.json``/``merges.txt`` of Stable Diffusion 1.x.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import os
import tempfile
from pathlib import Path

from core_jax.files import atomic_write_bytes

MERGES_RESOURCE = "clip_merges.txt.gz"
MERGES_HEADER = "#version: 0.2"
NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes go to code points 256.. so
    that no BPE symbol is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _shipped_merges_bytes() -> bytes:
    return importlib.resources.files(__package__).joinpath(MERGES_RESOURCE).read_bytes()


def parse_merges(raw: bytes, source: str = MERGES_RESOURCE) -> list[str]:
    """Merge lines ("a b") from the bytes of a gzipped merges.txt."""
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    if lines[0] != MERGES_HEADER:
        raise ValueError(f"{source}: first line is not {MERGES_HEADER!r}")
    merges = [line for line in lines[1:] if line]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{source}: holds {len(merges)} merges, expected {NUM_MERGES}")
    return merges


def read_merges(path: str | os.PathLike | None = None) -> list[str]:
    """Merges from a gzipped merges.txt; default: the one shipped with this package."""
    if path is None:
        return parse_merges(_shipped_merges_bytes())
    return parse_merges(Path(path).read_bytes(), str(path))


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id following CLIP's construction order."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("merges produce duplicate tokens; not a CLIP merges file")
    return vocab


def _tokenizer_files(merges: list[str]) -> dict[str, bytes]:
    vocab = build_vocab(merges)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,  # SD 1.x pads with end-of-text
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": "\n".join([MERGES_HEADER, *merges, ""]).encode("utf-8"),
        "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8"),
    }


def _cache_roots() -> list[Path]:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return [base / "core_jax", Path(tempfile.gettempdir()) / f"core_jax-{user}"]


def clip_tokenizer_dir() -> Path:
    """A folder with vocab.json, merges.txt and tokenizer_config.json for SD 1.x's tokenizer.

    Built once under ``$XDG_CACHE_HOME/core_jax`` (``~/.cache`` by default), or under the temp
    directory when that is not writable. The folder name carries a hash of the shipped merges,
    so a changed merges file never reads a stale cache.
    """
    raw = _shipped_merges_bytes()
    name = "clip-bpe-" + hashlib.sha256(raw).hexdigest()[:12]
    files = None
    errors = []
    for root in _cache_roots():
        folder = root / name
        if all((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            files = files or _tokenizer_files(parse_merges(raw))
            for fname, data in files.items():
                # Several processes (multi-host, pytest-xdist) may build it at once.
                atomic_write_bytes(folder / fname, data)
            return folder
        except OSError as e:
            errors.append(f"{folder}: {e}")
    raise OSError("cannot write the CLIP tokenizer cache: " + "; ".join(errors))

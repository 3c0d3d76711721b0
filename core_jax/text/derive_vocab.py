"""Regenerate ``clip_merges.txt.gz`` from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    python -m core_jax.text.derive_vocab PATH/TO/bpe_simple_vocab_16e6.txt.gz [--out FILE]

The open_clip file holds 262144 ranked merges after a header line; CLIP keeps the first
49152 - 256 - 2 = 48894 of them (its vocabulary is 512 byte tokens + merges + 2 specials).
The output is gzip with a fixed mtime and no file name, so reruns give identical bytes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
from pathlib import Path

from core_jax.text.vocab import MERGES_HEADER, MERGES_RESOURCE, NUM_MERGES, build_vocab


def derive_merges(source: str | os.PathLike) -> list[str]:
    """The 48894 merges CLIP uses, read from open_clip's vocabulary file."""
    lines = gzip.decompress(Path(source).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    bad = [m for m in merges if len(m.split(" ")) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(f"{source} does not look like CLIP's bpe_simple_vocab_16e6.txt.gz")
    build_vocab(merges)  # raises if the merges do not form a valid vocabulary
    return merges


def merges_gz_bytes(merges: list[str]) -> bytes:
    """Deterministic gzip bytes of a merges.txt with SD's ``#version: 0.2`` header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write("\n".join([MERGES_HEADER, *merges, ""]).encode("utf-8"))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).with_name(MERGES_RESOURCE)),
        help="output file (default: the copy shipped in this package)",
    )
    args = parser.parse_args(argv)
    data = merges_gz_bytes(derive_merges(args.source))
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes, {NUM_MERGES} merges)")


if __name__ == "__main__":
    main()

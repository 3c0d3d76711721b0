"""`core-jax score`: CLIP-T, CLIP-I and DINO of an image folder made by any tool.

Inputs: a folder of generated images; a JSONL prompts file, one row per image,
`{"image": "<path relative to the folder>", "prompt": "a S* dog in the snow"}` (an optional
`"class"` overrides the class word for that row); a folder of the subject's real photos; a
transformers CLIP folder and a DINO / DINOv2 folder. Outputs: `scores.jsonl` (one row per
image), `results.json` (means and what was used) and the means on stdout.

Everything the user supplied is checked before any model is loaded or compiled; each problem
is one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core_jax import weights
from core_jax.errors import InputError
from core_jax.eval import scores
from core_jax.files import atomic_write_bytes


@dataclass(frozen=True)
class Row:
    image: Path
    prompt: str
    class_word: str


def _read_rows(images: Path, prompts: Path, class_word: str, problems: list[str]) -> list[Row]:
    rows = []
    try:
        lines = prompts.read_text().splitlines()
    except OSError as err:
        problems.append(f"cannot read --prompts {prompts}: {err.strerror or err}")
        return rows
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            row = Row(images / record["image"], str(record["prompt"]),
                      str(record.get("class", class_word)))
        except (ValueError, KeyError, TypeError):
            problems.append(f"{prompts}, line {number}: expected a JSON object with \"image\" "
                            "and \"prompt\", e.g. {\"image\": \"0.png\", \"prompt\": \"a S* dog\"}")
            continue
        if images.is_dir() and not row.image.is_file():
            problems.append(f"{prompts}, line {number}: no image {row.image}")
        rows.append(row)
    if not rows and not problems:
        problems.append(f"--prompts {prompts} lists no images")
    return rows


def preflight(images: Path, prompts: Path, references: Path, clip: Path, dino: Path,
              class_word: str) -> list[Row]:
    """The rows to score, or InputError with every problem found, one line each."""
    problems = []
    if not images.is_dir():
        problems.append(f"--images {images} is not a folder")
    rows = _read_rows(images, prompts, class_word, problems)
    if not references.is_dir():
        problems.append(f"--references {references} is not a folder")
    elif not scores.image_files(references):
        problems.append(f"--references {references} has no images "
                        f"({', '.join(scores.IMAGE_SUFFIXES)})")
    clip_ok = True
    for flag, folder, what, types in [("clip", clip, "CLIP", ("clip",)),
                                      ("dino", dino, "DINO", ("vit", "dinov2"))]:
        try:
            weights.transformers_folder(folder, what, types)
        except InputError as err:
            problems.append(f"--{flag}: {err}")
            clip_ok = clip_ok and flag != "clip"
    if clip_ok:
        from core_jax.text.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(clip)
        except (FileNotFoundError, OSError, ValueError) as err:
            problems.append(f"--clip: {err}")
        else:
            for word in sorted({r.class_word for r in rows} - {""}):
                if not tokenizer.encode(word, add_special_tokens=False):
                    problems.append(f"class word {word!r} gives no tokens")
    if problems:
        # One line each: the CLI prefixes the first with "core-jax: ", so the others get it too.
        raise InputError("\ncore-jax: ".join(problems))
    return rows


def score_folder(
    images: str | Path, prompts: str | Path, references: str | Path, clip: str | Path,
    dino: str | Path, class_word: str = "", placeholder: str = "S*",
    out: str | Path | None = None, batch_size: int = scores.BATCH_SIZE,
    allow_pickle: bool = False, echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Score the folder, write `scores.jsonl` and `results.json` into `out` (default: the
    image folder) and return the results."""
    images, references = Path(images), Path(references)
    rows = preflight(images, Path(prompts), references, Path(clip), Path(dino), class_word)
    out = images if out is None else Path(out)
    photos = scores.image_files(references)

    clip_model = scores.ClipEmbedder(clip, batch_size, allow_pickle)
    texts = [scores.clip_t_text(r.prompt, placeholder, r.class_word) for r in rows]
    generated = clip_model.images([r.image for r in rows])
    clip_t = scores.clip_t(generated, clip_model.texts(texts))
    clip_i = scores.mean_similarity(generated, clip_model.images(photos))
    dino_model = scores.DinoEmbedder(dino, batch_size, allow_pickle)
    dino_scores = scores.mean_similarity(dino_model.images([r.image for r in rows]),
                                         dino_model.images(photos))

    records = [
        {"image": str(r.image.relative_to(images)) if r.image.is_relative_to(images)
         else str(r.image), "prompt": r.prompt, "clip_t_text": text,
         "clip_t": float(t), "clip_i": float(i), "dino": float(d)}
        for r, text, t, i, d in zip(rows, texts, clip_t, clip_i, dino_scores, strict=True)
    ]
    results = {
        "clip_t": float(np.mean(clip_t)), "clip_i": float(np.mean(clip_i)),
        "dino": float(np.mean(dino_scores)), "images": len(rows), "references": len(photos),
        "clip_model": str(Path(clip).resolve()), "dino_model": str(Path(dino).resolve()),
        "placeholder": placeholder, "class_word": class_word,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "scores.jsonl",
                       "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    echo(f"CLIP-T {results['clip_t']:.4f}  CLIP-I {results['clip_i']:.4f}  "
         f"DINO {results['dino']:.4f}  ({len(rows)} images, {len(photos)} references; "
         f"{out / 'results.json'})")
    return results

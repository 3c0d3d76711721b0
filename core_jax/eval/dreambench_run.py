"""`core-jax dreambench`: every (subject, method) of DreamBench trained as one sweep, sampled on
the same noise, scored with CLIP-T / CLIP-I / DINO, and tabulated with intervals.

Stages, each resumable (a rerun redoes nothing that is finished):

1. Training: subjects (google/dreambooth `dataset/` folders) x methods (`dreambench.methods`,
   the sweep's named settings) as one `core-jax sweep` in `WORKDIR/runs/`.
2. Sampling: per run, `images_per_prompt` images of every prompt of its subject's list (live
   subjects: the live prompts). Image j of prompt p of subject s starts from a seed fixed by
   (dreambench.seed, s, p, j), so every method of a subject is drawn from the same noise. PNGs
   in `WORKDIR/samples/<run>/`, written in fixed chunks so a resumed run draws the same images,
   and a `prompts.jsonl` listing them as `core-jax score --prompts` reads.
3. Scoring: one row per image in `scores.jsonl`, keyed by (method, subject, prompt, image) and
   by what the image and the scores came from (the run's training, sampling settings, the
   CLIP/DINO folders' digests); rows that match are not redone.
4. Tables: per method, the mean over subjects of each subject's mean, with a 95 % Student's t
   interval over subjects; differences to the reference method paired by subject, with paired
   t-test p-values Holm-corrected over every (method, score) comparison. `results.json`,
   `results.md` and `grids/<method>.png`.

Multi-host: training is the sweep's; sampling and scoring split the runs over the processes
(each on its own first device) and process 0 merges the scores and writes the tables.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from core_jax import export, weights
from core_jax.config import base_config
from core_jax.data import save_image_grid
from core_jax.diffusion import SAMPLERS
from core_jax.errors import InputError
from core_jax.eval import dreambench, scores
from core_jax.eval.stats import holm, paired_p, t_interval
from core_jax.files import atomic_write_bytes
from core_jax.sample import Pipeline, generate_seeded
from core_jax.text import add_placeholder_tokens, placeholder_string
from core_jax.train import setup as run_setup
from core_jax.train.loop import Run, is_done, read_result
from core_jax.train.sweep import check_same_training, expand_runs, sweep

PROTOCOL_FILE = "prompts_and_classes.txt"
SCORES_FILE = "scores.jsonl"
SAMPLE_PROMPTS_FILE = "prompts.jsonl"  # in samples/<run>/, as `core-jax score --prompts` reads
METRICS = ("clip_t", "clip_i", "dino")
NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}
# Files the digest of a model folder covers: what the loaders read, not other formats' copies.
_DIGESTED = (".json", ".safetensors", ".txt", ".model", ".bin")


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    class_word: str
    live: bool
    photos: tuple[Path, ...]
    templates: tuple[str, ...]  # the protocol's, "{0}" the unique token, "{1}" the class word


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked benchmark: runs[(subject, method)]."""

    subjects: list[Subject]
    methods: list[str]
    runs: dict[tuple[str, str], Run]
    training: ml_collections.ConfigDict  # the sweep config
    word: str  # the placeholder as prompts write it ("<s*>", or all V tokens)


def image_seed(seed: int, subject: str, template: str, image: int) -> int:
    """The seed of one image, the same for every method: from (seed, subject, prompt, image)."""
    digest = hashlib.sha256(f"{seed}\0{subject}\0{template}\0{image}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _subject_names(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(s).strip() for s in value]


def _check_weights_file(folder: Path, allow_pickle: bool) -> str | None:
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        return None
    if allow_pickle and names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        return None
    pickled = " (only pickled .bin weights: set dreambench.allow_pickle if you trust them)" if (
        names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}) else ""
    return f"{folder} has no model.safetensors{pickled}"


def _sensible_word(tokenizer: Any, word: str) -> str | None:
    """Why `word` is not a usable class word for `tokenizer`, or None."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        return "gives no tokens"
    specials = set(tokenizer.all_special_ids)
    if specials & set(ids):
        return "tokenizes to special tokens (" + ", ".join(
            tokenizer.convert_ids_to_tokens([i for i in ids if i in specials])) + ")"
    if len(ids) > 8:
        return f"is {len(ids)} tokens long (a class word is one or a few)"
    return None


def training_config(config: ml_collections.ConfigDict, subjects: list[Subject],
                    ) -> ml_collections.ConfigDict:
    """The sweep a dreambench config trains: its subjects as concepts, its methods as the
    sweep's named settings."""
    fields = config.to_dict()
    del fields["dreambench"]
    training = ml_collections.ConfigDict(fields)
    training.sweep.concepts = tuple(
        dict(name=s.name, images=str(s.photos[0].parent), super_category=s.class_word,
             templates="animate" if s.live else "inanimate") for s in subjects)
    training.sweep.settings = tuple(
        dict(name=m["name"], overrides=dict(m["overrides"])) for m in config.dreambench.methods)
    return training


def plan(config: ml_collections.ConfigDict, workdir: Path) -> Plan:
    """Check everything the command reads, before anything is loaded, compiled or written;
    InputError with every problem found, one line each."""
    b = config.dreambench
    problems: list[str] = []
    root = Path(b.root) if b.root else None
    protocol = None
    if root is None or not root.is_dir():
        problems.append(f"dreambench.root {b.root!r} is not a folder (google/dreambooth's "
                        "dataset/: a folder per subject and prompts_and_classes.txt)")
    else:
        try:
            protocol = dreambench.read_protocol(root / PROTOCOL_FILE)
        except InputError as err:
            problems.append(str(err))
    if b.images_per_prompt < 1 or b.steps < 1 or b.batch_size < 1:
        problems.append("dreambench.images_per_prompt, steps and batch_size must be at least 1")
    if b.sampler not in SAMPLERS:
        problems.append(f"dreambench.sampler is {b.sampler!r}; choose one of "
                        f"{', '.join(SAMPLERS)}")
    methods = [m["name"] for m in b.methods]
    if not methods or len(set(methods)) != len(methods) or not all(methods):
        problems.append(f"dreambench.methods need unique, non-empty names; got {methods}")
    elif b.reference not in methods:
        problems.append(f"dreambench.reference {b.reference!r} is not one of the methods "
                        f"{', '.join(methods)}")
    for m in b.methods:
        stages = [v for k, v in m["overrides"].items() if k.endswith(".methods")]
        if any("lora" in tuple(s) for s in stages) or "lora" in config.stage2.get("methods", ()):
            problems.append(f"dreambench method {m['name']!r} trains LoRA adapters, which "
                            "dreambench cannot sample yet; use unet_finetune or svdiff")
    if config.get("sweep") and config.sweep.get("grid"):
        problems.append("dreambench: give methods as dreambench.methods, not sweep.grid")

    subjects: list[Subject] = []
    if protocol is not None:
        wanted = _subject_names(b.subjects)
        for name in wanted:
            if name not in protocol.classes:
                problems.append(f"dreambench.subjects names {name!r}, which {PROTOCOL_FILE} "
                                "does not list")
        names = wanted or [n for n in protocol.classes if (root / n).is_dir()]
        if not names:
            problems.append(f"{root} has no folder for any subject of {PROTOCOL_FILE}")
        for name in names:
            if name not in protocol.classes:
                continue
            folder = root / name
            photos = tuple(scores.image_files(folder)) if folder.is_dir() else ()
            if not folder.is_dir():
                problems.append(f"subject {name!r}: no folder {folder}")
            elif not photos:
                problems.append(f"subject {name!r}: {folder} has no images "
                                f"({', '.join(scores.IMAGE_SUFFIXES)})")
            subjects.append(Subject(name, protocol.classes[name], protocol.is_live(name),
                                    photos, protocol.prompts(name)))
        all_templates = set(protocol.object_prompts) | set(protocol.live_prompts)
        for template in b.identity_excludes:
            if template not in all_templates:
                problems.append(f"dreambench.identity_excludes: {template!r} is none of "
                                f"{PROTOCOL_FILE}'s prompts (write it as the file does, "
                                "e.g. 'a red {0} {1}')")

    for key, what, types in (("clip", "CLIP", ("clip",)), ("dino", "DINO", ("vit", "dinov2"))):
        try:
            folder = weights.transformers_folder(b[key], what, types) if b[key] else None
        except InputError as err:
            problems.append(f"dreambench.{key}: {err}")
            continue
        if folder is None:
            problems.append(f"dreambench.{key} is empty: give a local transformers {what} "
                            "model folder")
            continue
        missing = _check_weights_file(folder, b.allow_pickle)
        if missing:
            problems.append(f"dreambench.{key}: {missing}")
        if key == "clip":
            from core_jax.text.tokenizer import load_tokenizer

            try:
                clip_tokenizer = load_tokenizer(folder)
            except (OSError, ValueError) as err:
                problems.append(f"dreambench.clip: {err}")
            else:
                for s in subjects:
                    why = _sensible_word(clip_tokenizer, s.class_word)
                    if why:
                        problems.append(f"subject {s.name!r}: class word {s.class_word!r} "
                                        f"{why} for the CLIP tokenizer")
    try:
        tokenizer = run_setup.run_tokenizer(config)
    except InputError as err:
        problems.append(str(err))
    else:
        for s in subjects:
            why = _sensible_word(tokenizer, s.class_word)
            if why:
                problems.append(f"subject {s.name!r}: class word {s.class_word!r} {why} for "
                                "the model's tokenizer")
    if problems:
        # One line each: the CLI prefixes the first with "core-jax: ", so the others get it too.
        raise InputError("\ncore-jax: ".join(problems))

    training = training_config(config, subjects)
    flat = expand_runs(training, workdir)
    runs = {(s.name, m): flat[i * len(methods) + j]
            for i, s in enumerate(subjects) for j, m in enumerate(methods)}
    tokenizer = run_setup.run_tokenizer(config)
    for s in subjects:
        first = runs[(s.name, methods[0])]
        run_setup.concept_text(first.config, copy.deepcopy(tokenizer))
        for m in methods:
            run_setup.check_config(runs[(s.name, m)].config)
            check_same_training(runs[(s.name, m)], workdir)
    word = placeholder_string(config.concept.placeholder, config.concept.num_vectors)
    return Plan(subjects, methods, runs, training, word)


# --- What results depend on ---------------------------------------------------------------------


def folder_digest(folder: Path, cache: dict[str, Any] | None = None) -> str:
    """sha256 over the relative names and contents of a model folder's weight, config and
    tokenizer files. `cache` ({path: [size, mtime_ns, digest]}) skips unchanged files."""
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()
                       and p.suffix in _DIGESTED and not p.name.startswith(".")):
        stat = path.stat()
        key = str(path.resolve())
        known = (cache or {}).get(key)
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            digest = known[2]
        else:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            digest = h.hexdigest()
            if cache is not None:
                cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
        total.update(f"{path.relative_to(folder)}\0{digest}\n".encode())
    return total.hexdigest()


def _digests(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """The model folders used, with digests (cached in WORKDIR/digests.json by size and time)."""
    cache_path = workdir / "digests.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    used: dict[str, Any] = {}
    if config.model.path:
        used["model"] = {"path": str(Path(config.model.path).resolve()),
                         "sha256": folder_digest(Path(config.model.path), cache)}
    else:
        used["model"] = {"preset": config.model.preset, "seed": config.seed,
                         "note": "random weights"}
    for key in ("clip", "dino"):
        folder = Path(config.dreambench[key])
        used[key] = {"path": str(folder.resolve()), "sha256": folder_digest(folder, cache),
                     "model_type": json.loads((folder / "config.json").read_text())["model_type"]}
    if jax.process_index() == 0:
        atomic_write_bytes(cache_path, json.dumps(cache, indent=1).encode())
    return used


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("core-jax", "jax", "jaxlib", "flax", "numpy", "transformers", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _sampling_key(config: ml_collections.ConfigDict, used: dict[str, Any]) -> dict[str, Any]:
    b = config.dreambench
    return {"images_per_prompt": b.images_per_prompt, "steps": b.steps, "sampler": b.sampler,
            "guidance_scale": b.guidance_scale, "seed": b.seed, "batch_size": b.batch_size,
            "resolution": config.data.resolution, "model": used["model"]}


def _short(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# --- Sampling -----------------------------------------------------------------------------------


def _image_name(prompt: int, image: int) -> str:
    return f"p{prompt:02d}_{image:02d}.png"


def _my_runs(p: Plan) -> list[tuple[Subject, str, Run]]:
    """This process's share of the finished runs (every process takes every P-th)."""
    todo = [(s, m, p.runs[(s.name, m)]) for s in p.subjects for m in p.methods]
    todo = [t for t in todo if is_done(t[2]) and read_result(t[2])["status"] == "done"]
    return todo[jax.process_index() :: jax.process_count()]


class _Sampler:
    """One pipeline and one compiled sampler for every run (the weights are arguments)."""

    def __init__(self, config: ml_collections.ConfigDict):
        models = run_setup.load_models(config)
        ids = add_placeholder_tokens(models.tokenizer, config.concept.placeholder,
                                     config.concept.num_vectors)
        self.pipeline = Pipeline(
            models.tokenizer, tuple(ids), models.text_encoder, models.params["text"],
            models.unet, models.params["unet"], models.vae, models.params["vae"],
            models.schedule, placeholder=config.concept.placeholder,
        )

    def for_run(self, folder: Path) -> tuple[Pipeline, np.ndarray]:
        _, learned = export.load_learned_embeds(folder / "learned_embeds.safetensors")
        pipeline = self.pipeline
        if (folder / "unet" / "config.json").is_file():
            # A shallow copy keeps the compiled sampler; only the U-Net weights differ.
            pipeline = copy.copy(self.pipeline)
            _, pipeline.unet_params = weights.load_unet(folder / "unet")
        return pipeline, learned


def _sample_runs(config: ml_collections.ConfigDict, p: Plan, workdir: Path,
                 key: dict[str, Any], log: Callable[[str], None]) -> int:
    """Draw the missing images of this process's runs; returns how many were drawn."""
    b = config.dreambench
    sampler, drawn = None, 0
    for subject, _, run in _my_runs(p):
        folder = workdir / "samples" / run.name
        mark = {"sampling": key, "trained": read_result(run)}
        mark_path = folder / "sampling.json"
        if mark_path.is_file() and json.loads(mark_path.read_text()) != mark:
            shutil.rmtree(folder)  # retrained or resampled differently: stale images
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(mark_path, json.dumps(mark, indent=1).encode())
        items = [(i, t, j) for i, t in enumerate(subject.templates)
                 for j in range(b.images_per_prompt)]
        chunks = [items[k : k + b.batch_size] for k in range(0, len(items), b.batch_size)]
        chunks = [c for c in chunks if not all((folder / _image_name(i, j)).is_file()
                                               for i, _, j in c)]
        if chunks:
            started = time.perf_counter()
            sampler = sampler or _Sampler(p.training)
            drawn += _draw(config, p, sampler, subject, run, folder, chunks)
            log(f"sampled {run.name}: {sum(len(c) for c in chunks)} images "
                f"({time.perf_counter() - started:.1f} s)")
        # After the images: the listing `core-jax score --prompts` reads, so this folder can be
        # rescored, or another tool's images scored the same way (docs/evaluation.md).
        atomic_write_bytes(folder / SAMPLE_PROMPTS_FILE, "".join(
            json.dumps({"image": _image_name(i, j), "prompt": dreambench.fill(t, "S*",
                        subject.class_word), "class": subject.class_word}) + "\n"
            for i, t, j in items).encode())
    return drawn


def _draw(config: ml_collections.ConfigDict, p: Plan, sampler: _Sampler, subject: Subject,
          run: Run, folder: Path, chunks: list[list[tuple[int, str, int]]]) -> int:
    b = config.dreambench
    pipeline, learned = sampler.for_run(run.folder)
    drawn = 0
    for chunk in chunks:
        padded = chunk + [chunk[-1]] * (b.batch_size - len(chunk))  # one shape, one compile
        images = generate_seeded(
            pipeline, [dreambench.fill(t, p.word, subject.class_word) for _, t, _ in padded],
            [image_seed(b.seed, subject.name, t, j) for _, t, j in padded], learned,
            steps=b.steps, sampler=b.sampler, guidance_scale=b.guidance_scale,
            height=config.data.resolution, width=config.data.resolution,
        )
        for (i, _, j), image in zip(chunk, images, strict=False):
            _write_png(folder / _image_name(i, j), image)
        drawn += len(chunk)
    return drawn


def _write_png(path: Path, image: np.ndarray) -> None:
    import io

    def png() -> bytes:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        return out.getvalue()

    atomic_write_bytes(path, png)


# --- Scoring ------------------------------------------------------------------------------------


def row_key(method: str, subject: str, prompt: int, image: int) -> str:
    return f"{method}/{subject}/{prompt:02d}/{image:02d}"


def read_scores(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every scored image by key: scores.jsonl and any per-process parts not merged yet (a
    crash between scoring and merging loses nothing). A torn last line is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    for path in [workdir / SCORES_FILE, *sorted(workdir.glob("scores.process*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows[row["key"]] = row
    return rows


def _clip_texts(template: str, class_word: str) -> tuple[str, str]:
    """CLIP-T's texts: the subject as its class word ("a dog in the snow"), and the subject
    left out entirely ("a in the snow", Textual Inversion's convention)."""
    return (" ".join(dreambench.fill(template, "", class_word).split()),
            " ".join(dreambench.fill(template, "", "").split()))


def _score_runs(config: ml_collections.ConfigDict, p: Plan, workdir: Path,
                sampling: dict[str, Any], used: dict[str, Any],
                log: Callable[[str], None]) -> int:
    """Score the images of this process's runs that have no matching row; appends to
    scores.process<i>.jsonl; returns how many were scored."""
    b = config.dreambench
    done = read_scores(workdir)
    models_key = _short({k: used[k]["sha256"] for k in ("clip", "dino")})
    clip = dino = None
    references: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    part = workdir / f"scores.process{jax.process_index()}.jsonl"
    scored = 0
    for subject, method, run in _my_runs(p):
        sample_key = _short({"sampling": sampling, "trained": read_result(run)})
        items = [(i, t, j) for i, t in enumerate(subject.templates)
                 for j in range(b.images_per_prompt)]
        todo = [(i, t, j) for i, t, j in items
                if (row := done.get(row_key(method, subject.name, i, j))) is None
                or row["sample"] != sample_key or row["models"] != models_key]
        if not todo:
            continue
        started = time.perf_counter()
        if clip is None:
            clip = scores.ClipEmbedder(b.clip, b.score_batch_size, b.allow_pickle)
            dino = scores.DinoEmbedder(b.dino, b.score_batch_size, b.allow_pickle)
        if subject.name not in references:
            references[subject.name] = (clip.images(subject.photos),
                                        dino.images(subject.photos))
        clip_refs, dino_refs = references[subject.name]
        paths = [workdir / "samples" / run.name / _image_name(i, j) for i, _, j in todo]
        clip_images = clip.images(paths)
        texts = [_clip_texts(t, subject.class_word) for _, t, _ in todo]
        with_class = scores.clip_t(clip_images, clip.texts([a for a, _ in texts]))
        without = scores.clip_t(clip_images, clip.texts([c for _, c in texts]))
        clip_i = scores.mean_similarity(clip_images, clip_refs)
        dino_scores = scores.mean_similarity(dino.images(paths), dino_refs)
        lines = []
        for n, (i, t, j) in enumerate(todo):
            lines.append(json.dumps({
                "key": row_key(method, subject.name, i, j), "method": method,
                "subject": subject.name, "prompt_index": i, "image": j, "template": t,
                "prompt": dreambench.fill(t, "S*", subject.class_word),
                "clip_t": float(with_class[n]), "clip_t_no_class": float(without[n]),
                "clip_i": float(clip_i[n]), "dino": float(dino_scores[n]),
                "sample": sample_key, "models": models_key,
            }) + "\n")
        with part.open("a") as f:  # whole lines, flushed per run: a crash loses one run's rows
            f.write("".join(lines))
        scored += len(todo)
        log(f"scored {run.name}: {len(todo)} images ({time.perf_counter() - started:.1f} s)")
    return scored


def _merge_scores(workdir: Path) -> dict[str, dict[str, Any]]:
    rows = read_scores(workdir)
    ordered = [rows[k] for k in sorted(rows)]
    atomic_write_bytes(workdir / SCORES_FILE,
                       "".join(json.dumps(r) + "\n" for r in ordered).encode())
    for part in workdir.glob("scores.process*.jsonl"):
        part.unlink()
    return rows


# --- Tables -------------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str], reference: str,
              clip_t_class_word: bool, identity_excludes: Sequence[str]) -> dict[str, Any]:
    """Per method: each score's mean over subjects (of per-subject means) with a 95 % interval,
    per-subject means, and paired differences to `reference` with Holm-adjusted p-values over
    every (method, score) comparison. CLIP-I and DINO leave out `identity_excludes` prompts."""
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        cell = per.setdefault(r["method"], {}).setdefault(r["subject"],
                                                          {m: [] for m in METRICS})
        cell["clip_t"].append(r["clip_t"] if clip_t_class_word else r["clip_t_no_class"])
        if r["template"] not in identity_excludes:
            cell["clip_i"].append(r["clip_i"])
            cell["dino"].append(r["dino"])
    means = {m: {s: {k: float(np.mean(v)) for k, v in cell.items() if v}
                 for s, cell in per.get(m, {}).items()} for m in methods}
    out: dict[str, Any] = {}
    comparisons = []
    for method in methods:
        subjects = sorted(means[method])
        entry: dict[str, Any] = {"subjects": len(subjects), "per_subject": means[method]}
        for metric in METRICS:
            values = [means[method][s][metric] for s in subjects if metric in means[method][s]]
            entry[metric] = t_interval(values) if values else None
            if method == reference:
                continue
            common = [s for s in subjects if metric in means[method][s]
                      and metric in means[reference].get(s, {})]
            d = [means[method][s][metric] - means[reference][s][metric] for s in common]
            entry[f"{metric}_vs_reference"] = (
                {**t_interval(d), "p": paired_p(d)} if d else None)
            if d:
                comparisons.append(entry[f"{metric}_vs_reference"])
        out[method] = entry
    for comparison, adjusted in zip(comparisons, holm([c["p"] for c in comparisons]),
                                    strict=True):
        comparison["p_holm"] = adjusted
    return out


def _cell(interval: dict[str, float] | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    f = "{:+.4f}" if signed else "{:.4f}"
    text = f.format(interval["mean"])
    if not math.isnan(interval["low"]):
        text += f" [{f.format(interval['low'])}, {f.format(interval['high'])}]"
    return text


def format_markdown(summary: dict[str, Any], reference: str) -> str:
    lines = ["| method | subjects | CLIP-T | CLIP-I | DINO |", "|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['subjects']} | " + " | ".join(
            _cell(s[m]) for m in METRICS) + " |")
    lines += ["", f"Differences to {reference}, paired by subject (95 % interval; p of a paired "
              "t-test, Holm-adjusted over every comparison of this table):", "",
              "| method | " + " | ".join(f"{NAMES[m]} - {reference} | p (Holm)" for m in METRICS)
              + " |", "|---|" + "---|---|" * len(METRICS)]
    for method, s in summary.items():
        if method == reference:
            continue
        cells = []
        for m in METRICS:
            d = s.get(f"{m}_vs_reference")
            cells += [_cell(d, True), "-" if d is None or math.isnan(d.get("p_holm", math.nan))
                      else f"{d['p_holm']:.3g}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _thumbnail(image: np.ndarray | Path, size: int) -> np.ndarray:
    if isinstance(image, Path):
        image = scores.read_image(image)
    picture = Image.fromarray(image)
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    picture = picture.crop((left, top, left + side, top + side))
    return np.asarray(picture.resize((size, size), Image.BICUBIC))


def _grids(config: ml_collections.ConfigDict, p: Plan, workdir: Path) -> dict[str, str]:
    """Per method: a row per subject, one real photo then the first image of each prompt."""
    size = config.dreambench.grid_size
    columns = 1 + max(len(s.templates) for s in p.subjects)
    blank = np.full((size, size, 3), 255, np.uint8)
    out = {}
    for method in p.methods:
        tiles = []
        for s in p.subjects:
            folder = workdir / "samples" / p.runs[(s.name, method)].name
            row = [_thumbnail(s.photos[0], size)]
            row += [_thumbnail(path, size) if (path := folder / _image_name(i, 0)).is_file()
                    else blank for i in range(len(s.templates))]
            tiles += row + [blank] * (columns - len(row))
        path = workdir / "grids" / f"{method}.png"
        out[method] = str(save_image_grid(np.stack(tiles), path, nrow=columns))
    return out


# --- The command --------------------------------------------------------------------------------


def run_dreambench(config: ml_collections.ConfigDict, workdir: str | Path,
                   log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Train, sample, score and tabulate (each skipping finished work); returns results.json's
    content (on every process), or None when a signal stopped the training (rerun to resume)."""
    started = time.perf_counter()
    workdir = Path(workdir)
    p = plan(config, workdir)
    b = config.dreambench
    log(f"dreambench: {len(p.subjects)} subjects x {len(p.methods)} methods = "
        f"{len(p.runs)} runs, {b.images_per_prompt} images per prompt")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write_bytes(workdir / "dreambench_config.json",
                           config.to_json(indent=2).encode())
    untrained = sum(not is_done(r) for r in p.runs.values())
    summary = sweep(p.training, workdir, progress=log)
    if summary is None:
        return None
    trained_at = time.perf_counter()
    used = _digests(config, workdir)
    sampling = _sampling_key(config, used)
    drawn = _sample_runs(config, p, workdir, sampling, log)
    sampled_at = time.perf_counter()
    scored = _score_runs(config, p, workdir, sampling, used, log)
    work = np.array([drawn, scored])
    if jax.process_count() > 1:
        work = multihost_utils.process_allgather(work).sum(axis=0)
        multihost_utils.sync_global_devices("core-jax dreambench: every run scored")
    if jax.process_index() == 0:
        rows = _merge_scores(workdir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("core-jax dreambench: scores merged")
    if jax.process_index() != 0:
        rows = read_scores(workdir)
    wanted = {row_key(m, s.name, i, j) for s in p.subjects for m in p.methods
              for i in range(len(s.templates)) for j in range(b.images_per_prompt)}
    rows_used = [r for k, r in sorted(rows.items()) if k in wanted]
    table = summarize(rows_used, p.methods, b.reference, b.clip_t_class_word,
                      tuple(b.identity_excludes))
    failed = sorted(r.name for r in p.runs.values() if read_result(r)["status"] != "done")
    results = {
        "protocol": {
            "root": str(Path(b.root).resolve()),
            "prompts_sha256": hashlib.sha256(
                (Path(b.root) / PROTOCOL_FILE).read_bytes()).hexdigest(),
            "subjects": {s.name: {"class": s.class_word, "live": s.live, "photos": len(s.photos),
                                  "prompts": len(s.templates)} for s in p.subjects},
            "images_per_prompt": b.images_per_prompt,
            "clip_t_text": "subject as its class word" if b.clip_t_class_word
                           else "subject left out",
            "identity_excludes": list(b.identity_excludes),
            "sampling": {k: v for k, v in sampling.items() if k != "model"},
            "interval": f"95 % Student's t over per-subject means; differences to "
                        f"{b.reference} paired by subject, p Holm-adjusted",
        },
        "reference": b.reference,
        "methods": table,
        "failed_runs": failed,
        "images_scored": len(rows_used),
        "used": {**used, "versions": _versions()},
        "work": {"runs_trained": untrained, "images_sampled": int(work[0]),
                 "images_scored": int(work[1]), "compilations": summary["compilations"]},
        "seconds": {"train": round(trained_at - started, 1),
                    "sample": round(sampled_at - trained_at, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    if jax.process_index() == 0:
        results["grids"] = _grids(config, p, workdir)
        atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
        over = "all prompts" + (" but " + ", ".join(map(repr, b.identity_excludes))
                                if b.identity_excludes else "")
        header = (f"# DreamBench\n\n{len(p.subjects)} subjects x {b.images_per_prompt} images "
                  f"per prompt; CLIP-T with the {results['protocol']['clip_t_text']}; CLIP-I "
                  f"and DINO over {over}; "
                  f"means with {results['protocol']['interval']}. CLIP {used['clip']['path']}, "
                  f"DINO {used['dino']['path']}.\n\n")
        if failed:
            header += f"Runs that failed in training (left out): {', '.join(failed)}.\n\n"
        atomic_write_bytes(workdir / "results.md",
                           (header + format_markdown(table, b.reference)).encode())
        log(f"results: {workdir / 'results.md'}, {workdir / 'results.json'}")
    return results


def dreambench_config(methods: Sequence[dict[str, Any]], reference: str
                      ) -> ml_collections.ConfigDict:
    """The `dreambench` section with its defaults (the configs fill in methods and models)."""
    d = ml_collections.ConfigDict()
    d.root = ""  # google/dreambooth's dataset/ folder
    d.subjects = ""  # comma-separated subset of the table; "" = every subject with a folder
    d.methods = tuple(dict(name=m["name"], overrides=dict(m["overrides"])) for m in methods)
    d.reference = reference  # differences are paired against this method
    d.clip = ""  # transformers CLIPModel folder (with its tokenizer)
    d.dino = ""  # transformers ViT (DINO) or DINOv2 folder
    d.allow_pickle = False  # read .bin weights of the CLIP / DINO folders
    d.images_per_prompt = 4
    d.steps = 50
    d.sampler = "ddim"
    d.guidance_scale = 7.5
    d.seed = 0  # with (subject, prompt, image), fixes each image's noise for every method
    d.batch_size = 8  # images per sampling call (fixed: one compile)
    d.score_batch_size = scores.BATCH_SIZE
    d.clip_t_class_word = True  # CLIP-T text: "a dog in the snow" (False: "a in the snow")
    d.identity_excludes = ()  # prompts (as the file writes them) left out of CLIP-I and DINO
    d.grid_size = 128  # pixels per tile in grids/<method>.png
    return d


# CoRe is base_config's two stages unchanged; TI is its stage 1 without CoRe's terms (no L_emb,
# no L_attn, no norm hold) and without stage 2.
PAPER_METHODS = (
    dict(name="ti", overrides={"stage1.methods": ("textual_inversion",),
                               "stage1.lambda_emb": 0.0, "stage1.lambda_attn": 0.0,
                               "stage2.steps": 0}),
    dict(name="core", overrides={}),
)


def paper_config(preset: str, model_env: str, protocol: str) -> ml_collections.ConfigDict:
    """configs/dreambench_sd21.py and _sd15.py: DreamBench's 25 prompts x 4 images per subject
    for PAPER_METHODS at the paper's settings, 512 px. Folders from the environment (empty
    otherwise, for the command's preflight to name): `model_env` (the diffusers model),
    CORE_JAX_DREAMBENCH_ROOT, CORE_JAX_CLIP_PATH, CORE_JAX_DINO_PATH. `protocol`: "dreambench"
    scores CLIP-I / DINO on every prompt, "core" leaves out the outfit prompts as CoRe's paper."""
    if protocol not in ("dreambench", "core"):
        raise ValueError(f"protocol is {protocol!r}; choose dreambench or core")
    c = base_config()
    c.model.preset = preset  # only used without model.path (random weights)
    c.model.path = os.environ.get(model_env, "")
    c.data.resolution = 512
    c.sample.at_end = False  # dreambench draws its own images: no grids per run
    # A stage-2 checkpoint holds each run's U-Net copy and its AdamW moments (about 10 GB in
    # fp32): every 250 steps writes 4 per run instead of base_config's 20.
    c.checkpoint_every = 250
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = ()  # dreambench fills them from its subjects
    # Runs per step: N on N devices (one run per device; stage 2 holds a U-Net copy and its
    # AdamW moments per run, about 14 GB in fp32).
    c.sweep.pack = 1
    c.sweep.concept_shards = 0  # fitted to the machine
    c.dreambench = dreambench_config(PAPER_METHODS, reference="ti")
    c.dreambench.root = os.environ.get("CORE_JAX_DREAMBENCH_ROOT", "")
    c.dreambench.clip = os.environ.get("CORE_JAX_CLIP_PATH", "")
    c.dreambench.dino = os.environ.get("CORE_JAX_DINO_PATH", "")
    c.dreambench.batch_size = 10  # a subject's 100 images in 10 calls, none padded
    if protocol == "core":
        c.dreambench.identity_excludes = dreambench.OUTFIT_PROMPTS
    return c

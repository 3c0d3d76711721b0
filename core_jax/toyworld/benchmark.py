"""`core-jax benchmark`: the CoRe-vs-Textual-Inversion method table, measured in the toy world.

Every (concept, method) pair is one run of a `core-jax sweep` (methods are the sweep's named
settings, so methods that share a graph train packed in one compiled step). Each finished run
then draws `images_per_prompt` images per benchmark prompt with its learned word (and its stage-2
U-Net, if it has one), and the attribute classifiers score them:

- identity: per image, the fraction of the concept's identity attributes (shape, colour, pattern)
  drawn as the concept has them, leaving out any attribute the prompt itself changes ("a teal S*"
  asks for another colour, so colour is not identity there);
- text alignment: per image, the fraction of the attributes the prompt asks for (background,
  style, a new colour) that are present.

A method's number is the mean over concepts of each concept's mean over prompts and images; its
95 % interval is Student's t over those per-concept means (concepts are the independent units:
images of one learned word are not). Differences to the reference method are paired by concept.
Every run samples from the same seed, so methods and concepts see the same starting noise.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from core_jax import export, weights
from core_jax.data import save_image_grid
from core_jax.diffusion import SAMPLERS
from core_jax.errors import InputError
from core_jax.eval.stats import t_interval
from core_jax.files import atomic_write_bytes
from core_jax.sample import Pipeline, generate
from core_jax.text import add_placeholder_tokens, placeholder_string
from core_jax.toyworld import classifier
from core_jax.toyworld.world import (
    ATTRIBUTES,
    COLOURS,
    IDENTITY_ATTRIBUTES,
    Identity,
    concept_images,
    identity_from_words,
    parse_caption,
)
from core_jax.train import setup as run_setup
from core_jax.train.sweep import Run, check_same_training, expand_runs, sweep

TOYWORLD_PREFIX = "toyworld:"
SCORES_FILE = "benchmark_scores.json"
SAMPLES_FILE = "benchmark_samples.npz"
GRID_UPSCALE = 3  # 32-pixel samples are hard to read at their size


def contrast_colour(colour: str) -> str:
    """The colour half-way round the world's colour list (red <-> teal, green <-> pink, ...):
    a recolouring prompt asks for a colour well away from the concept's own."""
    return COLOURS[(COLOURS.index(colour) + len(COLOURS) // 2) % len(COLOURS)]


@dataclasses.dataclass(frozen=True)
class PromptCheck:
    """One benchmark prompt filled in for one concept, and what the classifiers check."""

    text: str  # the prompt with the concept's word in it
    asks: dict[str, str]  # attribute -> value the prompt asks for (text alignment)
    identity: dict[str, str]  # attribute -> the concept's value, minus what the prompt changes


def prompt_check(template: str, identity: Identity, concept_word: str) -> PromptCheck:
    """`template` holds "{}" for the concept and may hold "{recolour}" (the concept's contrast
    colour): "a {} in the snow", "a {recolour} {}"."""
    if "{}" not in template:
        raise InputError(f"benchmark prompt {template!r} has no '{{}}' for the concept")
    try:
        text = template.format(concept_word, recolour=contrast_colour(identity.colour))
        context = template.format("", recolour=contrast_colour(identity.colour))
    except (IndexError, KeyError, ValueError) as err:
        raise InputError(
            f"benchmark prompt {template!r}: only '{{}}' and '{{recolour}}' may be filled ({err})"
        ) from err
    try:
        asks = parse_caption(context)
    except ValueError as err:
        raise InputError(f"benchmark prompt {template!r}: {err}") from err
    if not asks:
        raise InputError(
            f"benchmark prompt {template!r} asks for nothing the classifiers can check: name a "
            "background, a style or a colour"
        )
    kept = {a: getattr(identity, a) for a in IDENTITY_ATTRIBUTES if a not in asks}
    if not kept:
        raise InputError(f"benchmark prompt {template!r} changes the whole identity")
    return PromptCheck(text, asks, kept)


def score_images(
    predicted: Mapping[str, np.ndarray], check: PromptCheck
) -> tuple[np.ndarray, np.ndarray]:
    """Per image (identity, text alignment) in [0, 1], from the classifiers' predicted value
    indices {attribute: [N]}."""

    def agreement(wanted: Mapping[str, str]) -> np.ndarray:
        hits = [predicted[a] == ATTRIBUTES[a].index(v) for a, v in wanted.items()]
        return np.mean(hits, axis=0)

    return agreement(check.identity), agreement(check.asks)


def summarize(
    identity: np.ndarray,
    text: np.ndarray,
    methods: Sequence[str],
    concepts: Sequence[str],
    prompts: Sequence[str],
    reference: str,
) -> dict[str, Any]:
    """Per method: means and 95 % intervals over concepts, paired differences to `reference`,
    and per-prompt / per-concept means. identity, text: [methods, concepts, prompts] scores,
    each the mean over that cell's images."""
    per_concept_id, per_concept_text = identity.mean(-1), text.mean(-1)  # [M, C]
    ref = list(methods).index(reference)
    out: dict[str, Any] = {}
    for m, method in enumerate(methods):
        out[method] = {
            "identity": t_interval(per_concept_id[m]),
            "text": t_interval(per_concept_text[m]),
            "identity_vs_reference": t_interval(per_concept_id[m] - per_concept_id[ref]),
            "text_vs_reference": t_interval(per_concept_text[m] - per_concept_text[ref]),
            "per_prompt": {
                prompt: {"identity": float(identity[m, :, i].mean()),
                         "text": float(text[m, :, i].mean())}
                for i, prompt in enumerate(prompts)
            },
            "per_concept": {
                c: {"identity": float(per_concept_id[m, i]), "text": float(per_concept_text[m, i])}
                for i, c in enumerate(concepts)
            },
        }
    return out


def _cell(interval: Mapping[str, float], signed: bool = False) -> str:
    mean = f"{interval['mean']:+.3f}" if signed else f"{interval['mean']:.3f}"
    if math.isnan(interval["low"]):
        return mean
    return f"{mean} [{interval['low']:+.3f}, {interval['high']:+.3f}]" if signed else (
        f"{mean} [{interval['low']:.3f}, {interval['high']:.3f}]"
    )


def format_markdown(summary: Mapping[str, Any], prompts: Sequence[str], reference: str) -> str:
    """The method table (means [95 % interval]) and text alignment per prompt."""
    lines = [
        f"| method | identity | text alignment | identity - {reference} | text - {reference} |",
        "|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        differences = ("(reference)",) * 2 if method == reference else (
            _cell(s["identity_vs_reference"], True), _cell(s["text_vs_reference"], True)
        )
        lines.append(f"| {method} | {_cell(s['identity'])} | {_cell(s['text'])} | "
                     f"{differences[0]} | {differences[1]} |")
    lines += ["", "Text alignment (identity) per prompt, means over concepts and images:", ""]
    lines.append("| method | " + " | ".join(f"`{p}`" for p in prompts) + " |")
    lines.append("|---|" + "---|" * len(prompts))
    for method, s in summary.items():
        cells = [f"{s['per_prompt'][p]['text']:.2f} ({s['per_prompt'][p]['identity']:.2f})"
                 for p in prompts]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- Running it ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked benchmark: runs[c][m] is concept c trained with method m."""

    concepts: list[str]
    identities: list[Identity]
    methods: list[str]
    prompts: list[str]
    runs: list[list[Run]]
    training: ml_collections.ConfigDict  # the sweep config (no benchmark section)


def _training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    fields = config.to_dict()
    del fields["benchmark"]
    return ml_collections.ConfigDict(fields)


def plan(config: ml_collections.ConfigDict, workdir: Path) -> Plan:
    """Check everything the benchmark reads before anything is trained or written."""
    b = config.benchmark
    if not b.prompts:
        raise InputError("benchmark.prompts is empty")
    if b.images_per_prompt < 1 or b.steps < 1:
        raise InputError("benchmark.images_per_prompt and benchmark.steps must be at least 1")
    if b.sampler not in SAMPLERS:
        raise InputError(f"benchmark.sampler is {b.sampler!r}; choose one of "
                         f"{', '.join(SAMPLERS)}")
    if not config.sweep.concepts:
        raise InputError("sweep.concepts is empty: give at least one toy-world concept")
    if not Path(b.classifier).is_file():
        raise InputError(
            f"benchmark.classifier {b.classifier} does not exist (the toy world's ships in "
            "core_jax/toyworld/assets; or pass --config.benchmark.classifier=PATH)"
        )
    if not config.model.path or not Path(config.model.path).is_dir():
        raise InputError(
            f"model.path {config.model.path!r} is not a folder: the benchmark needs the toy model "
            "(core_jax/toyworld/assets/toy_model, or pass --config.model.path=FOLDER)"
        )
    if config.sweep.get("grid"):
        raise InputError("benchmark: give methods as sweep.settings, not sweep.grid")
    methods = [s["name"] for s in config.sweep.settings]
    if b.reference not in methods:
        raise InputError(f"benchmark.reference {b.reference!r} is not one of the methods "
                         f"{', '.join(methods)}")
    concepts, identities = [], []
    for concept in config.sweep.concepts:
        if not concept["images"].startswith(TOYWORLD_PREFIX):
            raise InputError(
                f"benchmark concept {concept['name']!r}: images must be a toy-world identity "
                f"('{TOYWORLD_PREFIX}green dotted star'), got {concept['images']!r}"
            )
        try:
            identity = identity_from_words(concept["images"].removeprefix(TOYWORLD_PREFIX))
        except ValueError as err:
            raise InputError(f"benchmark concept {concept['name']!r}: {err}") from err
        concepts.append(concept["name"])
        identities.append(identity)
    for template in b.prompts:  # raises on a bad prompt
        prompt_check(template, identities[0], config.concept.placeholder)
    training = _training_config(config)
    flat = expand_runs(training, workdir)
    runs = [flat[c * len(methods) : (c + 1) * len(methods)] for c in range(len(concepts))]
    for concept_runs in runs:
        # Placeholder, super-category and templates: errors and warnings now, not mid-sweep.
        run_setup.concept_text(concept_runs[0].config, run_setup.run_tokenizer(config))
        for run in concept_runs:
            run_setup.check_config(run.config)
            check_same_training(run, workdir)
    return Plan(concepts, identities, methods, list(b.prompts), runs, training)


def _evaluation_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run's scores depend on besides its training: stale scores are redone."""
    b = config.benchmark
    digest = hashlib.sha256(Path(b.classifier).read_bytes()).hexdigest()[:16]
    return {
        "prompts": list(b.prompts), "images_per_prompt": b.images_per_prompt, "steps": b.steps,
        "sampler": b.sampler, "guidance_scale": b.guidance_scale, "seed": b.seed,
        "classifier_sha256": digest,
    }


class _Evaluator:
    """One pipeline and one compiled sampler for every run (the weights are arguments)."""

    def __init__(self, config: ml_collections.ConfigDict):
        models = run_setup.load_models(config)
        placeholder_ids = add_placeholder_tokens(
            models.tokenizer, config.concept.placeholder, config.concept.num_vectors
        )
        self.pipeline = Pipeline(
            models.tokenizer, tuple(placeholder_ids), models.text_encoder, models.params["text"],
            models.unet, models.params["unet"], models.vae, models.params["vae"],
            models.schedule, placeholder=config.concept.placeholder,
        )
        self.word = placeholder_string(config.concept.placeholder, config.concept.num_vectors)
        self.classifier_params = classifier.load_params(config.benchmark.classifier)
        self.settings = config.benchmark

    def __call__(self, run_folder: Path, identity: Identity) -> tuple[np.ndarray, dict]:
        """Samples [P, K, H, W, 3] and per-prompt scores of one finished run."""
        _, learned = export.load_learned_embeds(run_folder / "learned_embeds.safetensors")
        pipeline = self.pipeline
        if (run_folder / "unet" / "config.json").is_file():
            # A shallow copy keeps the compiled sampler; only the U-Net weights differ.
            pipeline = copy.copy(self.pipeline)
            _, pipeline.unet_params = weights.load_unet(run_folder / "unet")
        checks = [prompt_check(t, identity, self.word) for t in self.settings.prompts]
        k = self.settings.images_per_prompt
        images = generate(
            pipeline, [c.text for c in checks], learned, num_images_per_prompt=k,
            steps=self.settings.steps, sampler=self.settings.sampler,
            guidance_scale=self.settings.guidance_scale, seed=self.settings.seed,
        )
        predicted = classifier.predict(self.classifier_params, images)
        scores = {}
        for i, (template, check) in enumerate(zip(self.settings.prompts, checks, strict=True)):
            rows = {a: v[i * k : (i + 1) * k] for a, v in predicted.items()}
            identity_scores, text_scores = score_images(rows, check)
            scores[template] = {
                "prompt": check.text, "asks": check.asks, "identity_checked": check.identity,
                "identity": identity_scores.tolist(), "text": text_scores.tolist(),
                "drawn": [{a: ATTRIBUTES[a][int(rows[a][j])] for a in ATTRIBUTES}
                          for j in range(k)],
            }
        return images.reshape(len(checks), k, *images.shape[1:]), scores


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode)


def _evaluate_runs(
    config: ml_collections.ConfigDict, p: Plan, workdir: Path, log: Callable[[str], None]
) -> None:
    key = _evaluation_key(config)
    todo = []
    for c, concept_runs in enumerate(p.runs):
        for run in concept_runs:
            folder = run.folder
            scores_path = folder / SCORES_FILE
            trained = json.loads((folder / "result.json").read_text())
            if scores_path.is_file():
                saved = json.loads(scores_path.read_text())
                if saved["evaluation"] == key and saved["trained"] == trained:
                    continue
            todo.append((c, run, trained))
    if not todo:
        log("every run is scored already")
        return
    evaluate = _Evaluator(config)
    for n, (c, run, trained) in enumerate(todo, 1):
        started = time.perf_counter()
        folder = run.folder
        samples, scores = evaluate(folder, p.identities[c])
        np.savez_compressed(folder / SAMPLES_FILE, samples=samples)
        record = {"run": run.name, "evaluation": key, "trained": trained, "prompts": scores}
        _write_text(folder / SCORES_FILE, json.dumps(record, indent=2))  # last: the done mark
        identity = np.mean([s["identity"] for s in scores.values()])
        text = np.mean([s["text"] for s in scores.values()])
        log(f"scored {n}/{len(todo)} {run.name}: identity {identity:.3f}, text alignment "
            f"{text:.3f} ({time.perf_counter() - started:.1f} s)")


def _method_grid(
    config: ml_collections.ConfigDict, p: Plan, m: int, workdir: Path, path: Path
) -> Path:
    """Rows: concepts; columns: one training photo, then the first sample of each prompt."""
    rows = []
    for c, identity in enumerate(p.identities):
        photo = concept_images(identity, size=config.data.resolution, seed=config.seed)[0]
        with np.load(p.runs[c][m].folder / SAMPLES_FILE) as f:
            rows.append(np.concatenate([photo[None], f["samples"][:, 0]]))
    images = np.concatenate(rows)
    images = images.repeat(GRID_UPSCALE, axis=1).repeat(GRID_UPSCALE, axis=2)
    return save_image_grid(images, path, nrow=1 + len(p.prompts))


def _score_arrays(p: Plan, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """identity, text [methods, concepts, prompts]: each cell the mean over its images."""
    shape = (len(p.methods), len(p.concepts), len(p.prompts))
    identity, text = np.zeros(shape), np.zeros(shape)
    for c, concept_runs in enumerate(p.runs):
        for m, run in enumerate(concept_runs):
            scores = json.loads((run.folder / SCORES_FILE).read_text())["prompts"]
            for i, template in enumerate(p.prompts):
                identity[m, c, i] = np.mean(scores[template]["identity"])
                text[m, c, i] = np.mean(scores[template]["text"])
    return identity, text


def run_benchmark(
    config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every (concept, method) run (skipping finished ones), score each, and write
    results.json, results.md and grid_<method>.png into `workdir`; returns results.json's
    content."""
    started = time.perf_counter()
    workdir = Path(workdir)
    p = plan(config, workdir)
    log(f"benchmark: {len(p.methods)} methods x {len(p.concepts)} concepts = "
        f"{len(p.methods) * len(p.concepts)} runs, {len(p.prompts)} prompts x "
        f"{config.benchmark.images_per_prompt} images each")
    workdir.mkdir(parents=True, exist_ok=True)
    _write_text(workdir / "benchmark_config.json", config.to_json(indent=2))
    summary = sweep(p.training, workdir, progress=log)
    trained = time.perf_counter()
    _evaluate_runs(config, p, workdir, log)
    scored = time.perf_counter()

    b = config.benchmark
    identity, text = _score_arrays(p, workdir)
    methods = summarize(identity, text, p.methods, p.concepts, p.prompts, b.reference)
    grids = {
        method: str(_method_grid(config, p, m, workdir, workdir / f"grid_{method}.png"))
        for m, method in enumerate(p.methods)
    }
    results = {
        "interval": f"95 % Student's t over the {len(p.concepts)} per-concept means; "
                    f"differences to {b.reference} paired by concept",
        "concepts": dict(zip(p.concepts, (i.words for i in p.identities), strict=True)),
        "prompts": p.prompts,
        "images_per_prompt": b.images_per_prompt,
        "reference": b.reference,
        "methods": methods,
        "grids": grids,
        "compilations": summary["compilations"],
        "seconds": {
            "train": round(trained - started, 1),
            "score": round(scored - trained, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    _write_text(workdir / "results.json", json.dumps(results, indent=2))
    table = format_markdown(methods, p.prompts, b.reference)
    header = (
        f"# Toy-world method table\n\n{len(p.concepts)} held-out concepts x "
        f"{len(p.prompts)} prompts x {b.images_per_prompt} images per method; means with "
        f"{results['interval']}. This session: {results['seconds']['total']:.0f} s "
        f"(training {results['seconds']['train']:.0f} s, scoring "
        f"{results['seconds']['score']:.0f} s; finished runs are not redone).\n\n"
    )
    _write_text(workdir / "results.md", header + table)
    return results

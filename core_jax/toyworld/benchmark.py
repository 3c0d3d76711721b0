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

Seeds are an axis (`benchmark.seeds`): each (concept, method) pair trains once per seed (the
sweep's `seed`: initial word, noise and batches) and samples from its own seed
(`benchmark.seed` + the training seed). Without `benchmark.seeds` each pair trains once at
`seed`, as the issue-8 table did.

A method's number is the mean over concepts of each concept's mean over seeds, prompts and
images; its 95 % interval is Student's t over those per-concept means (concepts are the
independent units: images and seeds of one concept are not). Differences to the reference method
are paired by concept; their two-sided paired-t p-values are Holm-adjusted across every
comparison of the table (each method but the reference x identity and text), and each difference
also gets a Bonferroni-adjusted interval (confidence 1 - 0.05 / comparisons), which holds
simultaneously for all of them.

Evaluation prompts must ask for something no regularization template asks (`check_held_out`):
a prompt that repeats a template measures the regularizer on its own training contexts.

`benchmark.drift` adds each run's context drift on the evaluation prompts (toyworld/drift.py:
CoRe's L_emb and L_attn against the super-category word, the learned word's share of
cross-attention), written per run and summarized per method.

`benchmark.lambda_search` turns the command into the lambda search: the same runs, on validation
concepts only, then per method the identity-vs-text curve over its lambda grid (a PNG) and the
lambda chosen by a stated rule (`choose_lambda`), written to lambda_search.json.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
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
from core_jax.eval.stats import holm, paired_p, t_interval
from core_jax.files import atomic_write_bytes
from core_jax.sample import Pipeline, generate
from core_jax.text import add_placeholder_tokens, load_templates, placeholder_string
from core_jax.toyworld import classifier
from core_jax.toyworld.drift import DRIFT_TIMESTEPS, DriftProbe
from core_jax.toyworld.world import (
    ATTRIBUTES,
    COLOURS,
    IDENTITY_ATTRIBUTES,
    TEST_IDENTITIES,
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
DRIFT_FILE = "benchmark_drift.json"
DRIFT_MEASURES = ("emb", "attn", "token_share", "super_category_share")
IMAGE_SCORES_FILE = "scores.csv"  # every image's scores, one row each
SEARCH_FILE = "lambda_search.json"
ALPHA = 0.05  # the family-wise error rate of the corrected comparisons
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


def check_held_out(prompts: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse an evaluation prompt whose context is a regularization template, verbatim or in
    other words: one that asks for exactly what a template asks (parse_caption of both), for
    any recolouring colour."""
    asked = {}
    for template in templates:
        asked.setdefault(tuple(sorted(parse_caption(template.format("")).items())), template)
    for prompt in prompts:
        for colour in COLOURS:
            context = prompt.format("{}", recolour=colour)
            asks = tuple(sorted(parse_caption(context.format("")).items()))
            if context in templates or asks in asked:
                same = context if context in templates else asked[asks]
                raise InputError(
                    f"benchmark prompt {prompt!r} repeats the regularization template {same!r}: "
                    "evaluation prompts must ask for what no template asks (compose two "
                    "attributes the templates never pair, e.g. a size or position with a "
                    "background)"
                )


def regularization_templates(config: ml_collections.ConfigDict) -> list[str]:
    """Every template a run of the benchmark may regularize with (its concepts' templates)."""
    out: list[str] = []
    for concept in config.sweep.concepts:
        try:
            out += [t for t in load_templates(concept["templates"]) if t not in out]
        except FileNotFoundError as err:
            raise InputError(f"benchmark concept {concept['name']!r}: {err}") from err
    return out


def score_images(
    predicted: Mapping[str, np.ndarray], check: PromptCheck
) -> tuple[np.ndarray, np.ndarray]:
    """Per image (identity, text alignment) in [0, 1], from the classifiers' predicted value
    indices {attribute: [N]}."""

    def agreement(wanted: Mapping[str, str]) -> np.ndarray:
        hits = [predicted[a] == ATTRIBUTES[a].index(v) for a, v in wanted.items()]
        return np.mean(hits, axis=0)

    return agreement(check.identity), agreement(check.asks)


METRICS = ("identity", "text")


def summarize(
    identity: np.ndarray,
    text: np.ndarray,
    methods: Sequence[str],
    concepts: Sequence[str],
    prompts: Sequence[str],
    reference: str,
) -> dict[str, Any]:
    """Per method: means and 95 % intervals over concepts of the seed-averaged per-concept
    scores, differences to `reference` paired by concept (raw 95 % interval, Bonferroni-adjusted
    interval, raw and Holm-adjusted p across every comparison), the spread over seeds, and
    per-prompt / per-concept means. identity, text: [methods, concepts, seeds, prompts] scores,
    each the mean over that cell's images."""
    scores = {"identity": identity, "text": text}
    per_concept = {k: v.mean(axis=(2, 3)) for k, v in scores.items()}  # [M, C]
    # Per concept, the standard deviation over seeds of its (prompt-averaged) score.
    seed_sd = {k: v.mean(-1).std(-1, ddof=1) if v.shape[2] > 1 else np.full(v.shape[:2], np.nan)
               for k, v in scores.items()}
    ref = list(methods).index(reference)
    compared = [(m, k) for m in range(len(methods)) if m != ref for k in METRICS]
    differences = {(m, k): per_concept[k][m] - per_concept[k][ref] for m, k in compared}
    raw_p = [paired_p(differences[c]) for c in compared]
    adjusted_p = dict(zip(compared, holm(raw_p), strict=True))
    raw_p = dict(zip(compared, raw_p, strict=True))
    bonferroni = 1 - ALPHA / max(len(compared), 1)
    out: dict[str, Any] = {}
    for m, method in enumerate(methods):
        row: dict[str, Any] = {}
        for k in METRICS:
            row[k] = t_interval(per_concept[k][m])
            row[f"{k}_seed_sd"] = float(seed_sd[k][m].mean())  # NaN with one seed
            d = differences.get((m, k), per_concept[k][m] * 0.0)
            versus = t_interval(d)
            adjusted = t_interval(d, confidence=bonferroni)
            versus.update(low_adjusted=adjusted["low"], high_adjusted=adjusted["high"],
                          p=raw_p.get((m, k), math.nan), p_holm=adjusted_p.get((m, k), math.nan))
            row[f"{k}_vs_reference"] = versus
        row["per_prompt"] = {
            prompt: {k: float(scores[k][m, :, :, i].mean()) for k in METRICS}
            for i, prompt in enumerate(prompts)
        }
        row["per_concept"] = {
            c: {k: float(per_concept[k][m, i]) for k in METRICS} for i, c in enumerate(concepts)
        }
        out[method] = row
    return out


def correction_note(methods: Sequence[str], reference: str) -> str:
    """What the difference columns hold, for results.json and results.md."""
    k = 2 * (len(methods) - 1)
    return (
        f"differences to {reference} paired by concept: mean [raw 95 % t interval] "
        f"{{Bonferroni-adjusted interval, confidence 1 - {ALPHA}/{k}}} p raw / p Holm-adjusted "
        f"over the {k} comparisons (each method but {reference} x identity and text)"
    )


def _cell(interval: Mapping[str, float], signed: bool = False) -> str:
    mean = f"{interval['mean']:+.3f}" if signed else f"{interval['mean']:.3f}"
    if math.isnan(interval["low"]):
        return mean
    return f"{mean} [{interval['low']:+.3f}, {interval['high']:+.3f}]" if signed else (
        f"{mean} [{interval['low']:.3f}, {interval['high']:.3f}]"
    )


def _difference_cell(d: Mapping[str, float]) -> str:
    cell = _cell(d, True)
    if not math.isnan(d.get("low_adjusted", math.nan)):
        cell += f" {{{d['low_adjusted']:+.3f}, {d['high_adjusted']:+.3f}}}"
    if not math.isnan(d.get("p", math.nan)):
        cell += f" p {d['p']:.3f} / {d['p_holm']:.3f}"
    return cell


def format_markdown(summary: Mapping[str, Any], prompts: Sequence[str], reference: str) -> str:
    """The method table (means [95 % interval]; differences with their corrected interval and
    p-values) and text alignment per prompt."""
    lines = [
        f"| method | identity | text alignment | identity - {reference} | text - {reference} "
        "| seed sd (identity, text) |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        differences = ("(reference)",) * 2 if method == reference else (
            _difference_cell(s["identity_vs_reference"]), _difference_cell(s["text_vs_reference"])
        )
        spread = ", ".join("-" if math.isnan(s[f"{k}_seed_sd"]) else f"{s[f'{k}_seed_sd']:.3f}"
                           for k in METRICS)
        lines.append(f"| {method} | {_cell(s['identity'])} | {_cell(s['text'])} | "
                     f"{differences[0]} | {differences[1]} | {spread} |")
    lines += ["", "Text alignment (identity) per prompt, means over concepts, seeds and images:",
              ""]
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
    """The checked benchmark: runs[c][m][s] is concept c trained with method m and seed s."""

    concepts: list[str]
    identities: list[Identity]
    methods: list[str]
    seeds: list[int]
    prompts: list[str]
    runs: list[list[list[Run]]]
    training: ml_collections.ConfigDict  # the sweep config (no benchmark section)


def benchmark_seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The training seeds of every (concept, method) pair: benchmark.seeds, or the one `seed`."""
    return [int(s) for s in config.benchmark.get("seeds", ())] or [int(config.seed)]


def sample_seed(config: ml_collections.ConfigDict, training_seed: int) -> int:
    """Each seed of a pair samples from its own noise; with one seed at 0, benchmark.seed."""
    return int(config.benchmark.seed) + training_seed


def _training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    fields = config.to_dict()
    del fields["benchmark"]
    training = ml_collections.ConfigDict(fields)
    if config.benchmark.get("seeds", ()):
        # The seed as the sweep's last grid axis: runs of one method share their programs.
        training.sweep.grid = (("seed", tuple(benchmark_seeds(config))),)
    return training


def _check_search(config: ml_collections.ConfigDict, methods: Sequence[str],
                  identities: Sequence[Identity]) -> None:
    """The lambda search names its settings and never touches a test concept."""
    search = config.benchmark.lambda_search
    for identity in identities:
        if identity in TEST_IDENTITIES:
            raise InputError(
                f"benchmark.lambda_search: concept {identity.words!r} is a test concept; the "
                "search may only use validation concepts (world.VALIDATION_IDENTITIES)"
            )
    for curve in search.curves:
        for setting, _ in curve["points"]:
            if setting not in methods:
                raise InputError(f"benchmark.lambda_search curve {curve['method']!r} names "
                                 f"{setting!r}, which is not one of sweep.settings")
    if search.reference not in methods:
        raise InputError(f"benchmark.lambda_search.reference {search.reference!r} is not one "
                         "of sweep.settings")


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
    seeds = benchmark_seeds(config)
    if len(set(seeds)) != len(seeds):
        raise InputError(f"benchmark.seeds repeat a seed: {seeds}")
    if not config.model.path or not Path(config.model.path).is_dir():
        raise InputError(
            f"model.path {config.model.path!r} is not a folder: the benchmark needs the toy model "
            "(export it there: launch/pretrain_toy.py [--v2] --export FOLDER; or pass "
            "--config.model.path=FOLDER)"
        )
    if not Path(b.classifier).is_file():
        raise InputError(
            f"benchmark.classifier {b.classifier} does not exist (the toy world's ships in "
            "core_jax/toyworld/assets; or pass --config.benchmark.classifier=PATH)"
        )
    if config.sweep.get("grid"):
        raise InputError("benchmark: give methods as sweep.settings (and seeds as "
                         "benchmark.seeds), not sweep.grid")
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
    if not b.get("prompts_may_repeat_templates", False):
        check_held_out(b.prompts, regularization_templates(config))
    if b.get("lambda_search"):
        _check_search(config, methods, identities)
    training = _training_config(config)
    flat = expand_runs(training, workdir)
    per_concept = len(methods) * len(seeds)
    runs = [
        [flat[c * per_concept + m * len(seeds) : c * per_concept + (m + 1) * len(seeds)]
         for m in range(len(methods))]
        for c in range(len(concepts))
    ]
    for concept_runs in runs:
        # Placeholder, super-category and templates: errors and warnings now, not mid-sweep.
        run_setup.concept_text(concept_runs[0][0].config, run_setup.run_tokenizer(config))
        for seed_runs in concept_runs:
            for run in seed_runs:
                run_setup.check_config(run.config)
                check_same_training(run, workdir)
    return Plan(concepts, identities, methods, seeds, list(b.prompts), runs, training)


def _evaluation_key(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
    """What a run's scores depend on besides its training: stale scores are redone."""
    b = config.benchmark
    digest = hashlib.sha256(Path(b.classifier).read_bytes()).hexdigest()[:16]
    return {
        "prompts": list(b.prompts), "images_per_prompt": b.images_per_prompt, "steps": b.steps,
        "sampler": b.sampler, "guidance_scale": b.guidance_scale, "seed": seed,
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

    def run_weights(self, run_folder: Path) -> tuple[np.ndarray, Any]:
        """A finished run's learned vectors and its U-Net weights (its own after stage 2)."""
        _, learned = export.load_learned_embeds(run_folder / "learned_embeds.safetensors")
        if (run_folder / "unet" / "config.json").is_file():
            return learned, weights.load_unet(run_folder / "unet")[1]
        return learned, self.pipeline.unet_params

    def __call__(
        self, run_folder: Path, identity: Identity, seed: int
    ) -> tuple[np.ndarray, dict]:
        """Samples [P, K, H, W, 3] and per-prompt scores of one finished run."""
        learned, unet_params = self.run_weights(run_folder)
        pipeline = self.pipeline
        if unet_params is not self.pipeline.unet_params:
            # A shallow copy keeps the compiled sampler; only the U-Net weights differ.
            pipeline = copy.copy(self.pipeline)
            pipeline.unet_params = unet_params
        checks = [prompt_check(t, identity, self.word) for t in self.settings.prompts]
        k = self.settings.images_per_prompt
        images = generate(
            pipeline, [c.text for c in checks], learned, num_images_per_prompt=k,
            steps=self.settings.steps, sampler=self.settings.sampler,
            guidance_scale=self.settings.guidance_scale, seed=seed,
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


def _all_runs(p: Plan) -> list[tuple[int, int, int, Run]]:
    """(concept, method, seed index, run) of every run."""
    return [(c, m, s, run) for c, concept_runs in enumerate(p.runs)
            for m, seed_runs in enumerate(concept_runs) for s, run in enumerate(seed_runs)]


def _evaluate_runs(
    config: ml_collections.ConfigDict, p: Plan, evaluator: Callable[[], _Evaluator],
    log: Callable[[str], None],
) -> None:
    todo = []
    for c, _, s, run in _all_runs(p):
        key = _evaluation_key(config, sample_seed(config, p.seeds[s]))
        scores_path = run.folder / SCORES_FILE
        trained = json.loads((run.folder / "result.json").read_text())
        if scores_path.is_file():
            saved = json.loads(scores_path.read_text())
            if saved["evaluation"] == key and saved["trained"] == trained:
                continue
        todo.append((c, s, run, trained, key))
    if not todo:
        log("every run is scored already")
        return
    evaluate = evaluator()
    for n, (c, s, run, trained, key) in enumerate(todo, 1):
        started = time.perf_counter()
        folder = run.folder
        samples, scores = evaluate(folder, p.identities[c], key["seed"])
        np.savez_compressed(folder / SAMPLES_FILE, samples=samples)
        record = {"run": run.name, "training_seed": p.seeds[s], "evaluation": key,
                  "trained": trained, "prompts": scores}
        _write_text(folder / SCORES_FILE, json.dumps(record, indent=2))  # last: the done mark
        identity = np.mean([v["identity"] for v in scores.values()])
        text = np.mean([v["text"] for v in scores.values()])
        log(f"scored {n}/{len(todo)} {run.name}: identity {identity:.3f}, text alignment "
            f"{text:.3f} ({time.perf_counter() - started:.1f} s)")


def _measure_drift(
    config: ml_collections.ConfigDict, p: Plan, evaluator: Callable[[], _Evaluator],
    log: Callable[[str], None],
) -> None:
    """Each run's context drift on the evaluation prompts (toyworld.drift), written to
    runs/<run>/benchmark_drift.json; runs measured with the same inputs are skipped."""
    probe = None
    for c, _, s, run in _all_runs(p):
        identity = p.identities[c]
        templates = [t.format("{}", recolour=contrast_colour(identity.colour))
                     for t in p.prompts]
        key = {"prompts": templates, "timesteps": list(DRIFT_TIMESTEPS),
               "seed": sample_seed(config, p.seeds[s]),
               "trained": json.loads((run.folder / "result.json").read_text())}
        path = run.folder / DRIFT_FILE
        if path.is_file() and json.loads(path.read_text())["key"] == key:
            continue
        evaluate = evaluator()
        probe = probe or DriftProbe(evaluate.pipeline)
        started = time.perf_counter()
        learned, unet_params = evaluate.run_weights(run.folder)
        photo = concept_images(identity, n=1, size=config.data.resolution, seed=config.seed)[0]
        measured = probe(learned, templates, run.config.concept.super_category, photo,
                         seed=key["seed"], unet_params=unet_params)
        _write_text(path, json.dumps({"run": run.name, "key": key, **measured}, indent=2))
        log(f"drift {run.name}: L_emb {measured['emb']:.4f}, L_attn {measured['attn']:.2e}, "
            f"token share {measured['token_share']:.3f} (super-category word "
            f"{measured['super_category_share']:.3f}) ({time.perf_counter() - started:.1f} s)")


def summarize_drift(
    values: Mapping[str, np.ndarray], methods: Sequence[str], reference: str
) -> dict[str, Any]:
    """Per method and measure: the mean over concepts of the seed-averaged values with its 95 %
    interval, and the difference to `reference` paired by concept (descriptive: no correction).
    values: {measure: [methods, concepts, seeds]}."""
    ref = list(methods).index(reference)
    out: dict[str, Any] = {}
    for m, method in enumerate(methods):
        out[method] = {}
        for measure, v in values.items():
            per_concept = v.mean(-1)
            out[method][measure] = t_interval(per_concept[m])
            out[method][f"{measure}_vs_reference"] = t_interval(per_concept[m] - per_concept[ref])
    return out


def _drift_arrays(p: Plan) -> dict[str, np.ndarray]:
    shape = (len(p.methods), len(p.concepts), len(p.seeds))
    values = {k: np.zeros(shape) for k in DRIFT_MEASURES}
    for c, m, s, run in _all_runs(p):
        record = json.loads((run.folder / DRIFT_FILE).read_text())
        for k in DRIFT_MEASURES:
            values[k][m, c, s] = record[k]
    return values


def format_drift_markdown(drift: Mapping[str, Any], reference: str) -> str:
    lines = [
        "Context drift on the evaluation prompts (toyworld/drift.py): CoRe's L_emb and L_attn "
        "between the prompt with the learned word and with the super-category word, and the "
        "share of cross-attention the learned word takes (the super-category word's share in "
        f"the same prompts beside it); means over concepts [95 % t]; differences to {reference} "
        "paired by concept, uncorrected.",
        "",
        f"| method | L_emb | L_attn | token share | super-category share | L_emb - {reference} "
        f"| token share - {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, d in drift.items():
        diffs = ("(reference)",) * 2 if method == reference else (
            _cell(d["emb_vs_reference"], True), _cell(d["token_share_vs_reference"], True))
        lines.append(
            f"| {method} | {_cell(d['emb'])} | {d['attn']['mean']:.2e} | "
            f"{_cell(d['token_share'])} | {_cell(d['super_category_share'])} | {diffs[0]} | "
            f"{diffs[1]} |"
        )
    return "\n".join(lines) + "\n"


def _method_grid(
    config: ml_collections.ConfigDict, p: Plan, m: int, workdir: Path, path: Path
) -> Path:
    """Rows: concepts; columns: one training photo, then the first sample of each prompt (of
    the first seed)."""
    rows = []
    for c, identity in enumerate(p.identities):
        photo = concept_images(identity, size=config.data.resolution, seed=config.seed)[0]
        with np.load(p.runs[c][m][0].folder / SAMPLES_FILE) as f:
            rows.append(np.concatenate([photo[None], f["samples"][:, 0]]))
    images = np.concatenate(rows)
    images = images.repeat(GRID_UPSCALE, axis=1).repeat(GRID_UPSCALE, axis=2)
    return save_image_grid(images, path, nrow=1 + len(p.prompts))


def _score_arrays(p: Plan, workdir: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """identity, text [methods, concepts, seeds, prompts] (each cell the mean over its images)
    and one row per image for scores.csv."""
    shape = (len(p.methods), len(p.concepts), len(p.seeds), len(p.prompts))
    identity, text = np.zeros(shape), np.zeros(shape)
    rows = []
    for c, m, s, run in _all_runs(p):
        record = json.loads((run.folder / SCORES_FILE).read_text())
        for i, template in enumerate(p.prompts):
            cell = record["prompts"][template]
            identity[m, c, s, i] = np.mean(cell["identity"])
            text[m, c, s, i] = np.mean(cell["text"])
            for j, (a, b) in enumerate(zip(cell["identity"], cell["text"], strict=True)):
                rows.append({
                    "concept": p.concepts[c], "method": p.methods[m], "training_seed": p.seeds[s],
                    "sample_seed": record["evaluation"]["seed"], "prompt": template, "image": j,
                    "identity": a, "text": b, "run": run.name,
                })
    return identity, text, rows


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    def table() -> bytes:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()

    atomic_write_bytes(path, table)


# --- The lambda search ----------------------------------------------------------------------------


def choose_lambda(
    points: Sequence[tuple[float, float, float]], reference_identity: float, tolerance: float
) -> dict[str, Any]:
    """The rule: among a method's (lambda, identity, text) points, the one with the highest text
    alignment whose identity is at least the reference's minus `tolerance` (ties: the smaller
    lambda). None when no point keeps identity within the tolerance."""
    floor = reference_identity - tolerance
    kept = [pt for pt in points if pt[1] >= floor]
    if not kept:
        return {"lambda": None, "identity_floor": floor,
                "why": f"no lambda keeps identity within {tolerance} of the reference"}
    best = max(kept, key=lambda pt: (pt[2], -pt[0]))
    return {"lambda": best[0], "identity": best[1], "text": best[2], "identity_floor": floor}


def _plot_curve(path: Path, method: str, points: Sequence[tuple[float, float, float]],
                reference: tuple[str, float, float], floor: float,
                chosen: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ordered = sorted(points)
    ax.plot([pt[2] for pt in ordered], [pt[1] for pt in ordered], "o-", label=method)
    for lam, identity, text in ordered:
        ax.annotate(f"{lam:g}", (text, identity), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, color="red" if lam == chosen else "black")
    ax.plot([reference[2]], [reference[1]], "k*", markersize=12, label=reference[0])
    ax.axhline(floor, color="grey", linestyle=":", label="identity floor")
    ax.set_xlabel("text alignment")
    ax.set_ylabel("identity")
    ax.set_title(f"{method}: identity vs text over lambda")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lambda_search_results(
    config: ml_collections.ConfigDict, methods: Mapping[str, Any], workdir: Path
) -> dict[str, Any]:
    """Per curve of benchmark.lambda_search: its points (means over validation concepts), the
    chosen lambda and its overrides, and the PNG of the curve."""
    search = config.benchmark.lambda_search
    ref = methods[search.reference]
    reference = (search.reference, ref["identity"]["mean"], ref["text"]["mean"])
    overrides = {s["name"]: dict(s["overrides"]) for s in config.sweep.settings}
    out: dict[str, Any] = {
        "rule": f"per method, the lambda with the highest mean text alignment whose mean "
                f"identity is at least {search.reference}'s minus {search.identity_tolerance} "
                "(means over the validation concepts and seeds; ties: the smaller lambda)",
        "reference": {"method": search.reference, "identity": reference[1],
                      "text": reference[2]},
        "methods": {},
    }
    for curve in search.curves:
        by_lambda = {float(lam): name for name, lam in curve["points"]}
        points = [(lam, methods[name]["identity"]["mean"], methods[name]["text"]["mean"])
                  for lam, name in by_lambda.items()]
        chosen = choose_lambda(points, reference[1], search.identity_tolerance)
        png = _plot_curve(workdir / f"lambda_curve_{curve['method']}.png", curve["method"],
                          points, reference, chosen["identity_floor"], chosen["lambda"])
        if chosen["lambda"] is not None:
            chosen["setting"] = by_lambda[chosen["lambda"]]
            chosen["overrides"] = overrides[chosen["setting"]]
        out["methods"][curve["method"]] = {
            "points": [{"lambda": lam, "identity": i, "text": t, "setting": by_lambda[lam]}
                       for lam, i, t in sorted(points)],
            "chosen": chosen, "plot": str(png),
        }
    return out


# --- The command ----------------------------------------------------------------------------------


def run_benchmark(
    config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every (concept, method, seed) run (skipping finished ones), score each, and write
    results.json, results.md, scores.csv and grid_<method>.png into `workdir` (and, for a
    lambda search, lambda_search.json and lambda_curve_<method>.png); returns results.json's
    content."""
    started = time.perf_counter()
    workdir = Path(workdir)
    p = plan(config, workdir)
    n_runs = len(p.methods) * len(p.concepts) * len(p.seeds)
    log(f"benchmark: {len(p.methods)} methods x {len(p.concepts)} concepts x {len(p.seeds)} "
        f"seeds = {n_runs} runs, {len(p.prompts)} prompts x "
        f"{config.benchmark.images_per_prompt} images each")
    workdir.mkdir(parents=True, exist_ok=True)
    _write_text(workdir / "benchmark_config.json", config.to_json(indent=2))
    summary = sweep(p.training, workdir, progress=log)
    trained = time.perf_counter()
    loaded: list[_Evaluator] = []

    def evaluator() -> _Evaluator:  # loaded once, and only when some run needs it
        if not loaded:
            loaded.append(_Evaluator(config))
        return loaded[0]

    _evaluate_runs(config, p, evaluator, log)
    if config.benchmark.get("drift", False):
        _measure_drift(config, p, evaluator, log)
    scored = time.perf_counter()

    b = config.benchmark
    identity, text, image_rows = _score_arrays(p, workdir)
    _write_csv(workdir / IMAGE_SCORES_FILE, image_rows)
    methods = summarize(identity, text, p.methods, p.concepts, p.prompts, b.reference)
    grids = {
        method: str(_method_grid(config, p, m, workdir, workdir / f"grid_{method}.png"))
        for m, method in enumerate(p.methods)
    }
    results = {
        "interval": f"95 % Student's t over the {len(p.concepts)} per-concept means (each the "
                    f"mean over {len(p.seeds)} seeds); "
                    + correction_note(p.methods, b.reference),
        "concepts": dict(zip(p.concepts, (i.words for i in p.identities), strict=True)),
        "seeds": {"training": p.seeds,
                  "sampling": [sample_seed(config, s) for s in p.seeds]},
        "prompts": p.prompts,
        "prompts_held_out": not b.get("prompts_may_repeat_templates", False),
        "images_per_prompt": b.images_per_prompt,
        "reference": b.reference,
        "unfilled_lambdas": list(b.get("unfilled_lambdas", ())),
        "methods": methods,
        "grids": grids,
        "artifacts": {
            "per_image_scores": str(workdir / IMAGE_SCORES_FILE),
            "run_configs": "runs/<run>/config.json (resolved, as trained)",
            "benchmark_config": str(workdir / "benchmark_config.json"),
        },
        "compilations": summary["compilations"],
        "seconds": {
            "train": round(trained - started, 1),
            "score": round(scored - trained, 1),
        },
    }
    if b.get("drift", False):
        results["drift"] = summarize_drift(_drift_arrays(p), p.methods, b.reference)
    if b.get("lambda_search"):
        results["lambda_search"] = lambda_search_results(config, methods, workdir)
        _write_text(workdir / SEARCH_FILE, json.dumps(results["lambda_search"], indent=2))
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    _write_text(workdir / "results.json", json.dumps(results, indent=2))
    table = format_markdown(methods, p.prompts, b.reference)
    seconds = results["seconds"]
    header = (
        f"# Toy-world method table\n\nRuntime of this command: {seconds['total']:.0f} s "
        f"(training {seconds['train']:.0f} s, scoring and drift {seconds['score']:.0f} s; "
        f"finished runs are not redone).\n\n{len(p.concepts)} concepts x {len(p.seeds)} seeds x "
        f"{len(p.prompts)} prompts x {b.images_per_prompt} images per method; means with "
        f"{results['interval']}.\n\n"
    )
    if not results["prompts_held_out"]:
        header += ("Warning: the evaluation prompts repeat regularization templates "
                   "(benchmark.prompts_may_repeat_templates), which favours regularized "
                   "methods.\n\n")
    if results["unfilled_lambdas"]:
        header += (f"Warning: placeholder lambdas, not yet chosen by the validation search: "
                   f"{', '.join(results['unfilled_lambdas'])}.\n\n")
    if "drift" in results:
        table += "\n" + format_drift_markdown(results["drift"], b.reference)
    _write_text(workdir / "results.md", header + table)
    return results

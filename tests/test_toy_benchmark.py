"""`core-jax benchmark`: prompts and what they check, the scores and their intervals, the
methods as named sweep settings, and the whole command on a 2-concept, 2-method, 2-prompt
miniature (a random toy model and classifier built here, so the shipped assets are not needed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from core_jax.errors import InputError
from core_jax.eval.stats import holm
from core_jax.toyworld import benchmark
from core_jax.toyworld import classifier as attribute_classifier
from core_jax.toyworld import model as toy_model
from core_jax.toyworld.world import (
    ATTRIBUTES,
    COLOURS,
    TEST_IDENTITIES,
    VALIDATION_IDENTITIES,
    Identity,
    parse_caption,
)
from core_jax.train.sweep import check_same_training, expand_runs, group_key

ROOT = Path(__file__).resolve().parents[1]
STAR = Identity("star", "green", "dotted")


def _toy_benchmark_config() -> ml_collections.ConfigDict:
    path = ROOT / "configs/toy_benchmark.py"
    spec = importlib.util.spec_from_file_location("toy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_contrast_colours_pair_up_and_differ():
    for colour in COLOURS:
        assert benchmark.contrast_colour(colour) != colour
        assert benchmark.contrast_colour(benchmark.contrast_colour(colour)) == colour
    assert benchmark.contrast_colour("red") == "teal"


def test_prompt_checks_name_what_they_ask_and_what_stays_identity():
    grass = benchmark.prompt_check("a {} on grass, sketch style", STAR, "<s*>")
    assert grass.text == "a <s*> on grass, sketch style"
    assert grass.asks == {"background": "grass", "style": "sketch"}
    assert grass.identity == {"shape": "star", "colour": "green", "pattern": "dotted"}
    recolour = benchmark.prompt_check("a {recolour} {}", STAR, "<s*>")
    assert recolour.text == "a pink <s*>" and recolour.asks == {"colour": "pink"}
    assert recolour.identity == {"shape": "star", "pattern": "dotted"}  # colour is changed


@pytest.mark.parametrize("template, message", [
    ("a star on grass", "no '{}'"),
    ("a photo of a {}", "asks for nothing"),
    ("a {} in the {place}", "only '{}' and '{recolour}'"),
    ("a {} on grass in the snow", "names two backgrounds"),
    ("a {recolour} striped circle {}", "changes the whole identity"),
])
def test_bad_prompts_are_refused_in_one_line(template, message):
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        benchmark.prompt_check(template, STAR, "<s*>")


def test_scores_are_fractions_of_checked_attributes():
    check = benchmark.prompt_check("a {recolour} {} on grass", STAR, "<s*>")
    index = {a: {v: i for i, v in enumerate(values)} for a, values in ATTRIBUTES.items()}
    drawn = [  # (shape, colour, pattern, background) of three images
        ("star", "pink", "dotted", "grass"),  # all right
        ("star", "green", "solid", "snow"),  # half the identity; no asked attribute
        ("heart", "pink", "dotted", "grass"),  # identity pattern only; both asks
    ]
    predicted = {a: np.zeros(3, np.int32) for a in ATTRIBUTES}
    for j, (shape, colour, pattern, background) in enumerate(drawn):
        for a, v in (("shape", shape), ("colour", colour), ("pattern", pattern),
                     ("background", background)):
            predicted[a][j] = index[a][v]
    identity, text = benchmark.score_images(predicted, check)
    np.testing.assert_allclose(identity, [1.0, 0.5, 0.5])
    np.testing.assert_allclose(text, [1.0, 0.0, 1.0])


def test_t_interval_matches_the_textbook_formula():
    values = np.array([0.2, 0.5, 0.4, 0.9, 0.6])
    interval = benchmark.t_interval(values)
    half = stats.t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    assert interval["mean"] == pytest.approx(0.52) and interval["n"] == 5
    assert interval["low"] == pytest.approx(0.52 - half)
    assert interval["high"] == pytest.approx(0.52 + half)
    lone = benchmark.t_interval([0.3])
    assert lone["mean"] == 0.3 and np.isnan(lone["low"]) and np.isnan(lone["high"])


def test_summary_pairs_differences_by_concept():
    # 2 methods x 3 concepts x 1 seed x 2 prompts. Concepts differ a lot, the methods by a
    # constant: the paired interval of the difference is a point, the unpaired intervals wide.
    concept_level = np.array([0.1, 0.5, 0.9])[None, :, None, None]
    identity = np.broadcast_to(concept_level, (2, 3, 1, 2)).copy()
    text = identity + np.array([0.0, 0.1])[:, None, None, None]
    summary = benchmark.summarize(
        identity, text, ["ti", "core"], ["a", "b", "c"], ["p", "q"], reference="ti"
    )
    core = summary["core"]
    assert core["text"]["mean"] == pytest.approx(0.6)
    assert core["text_vs_reference"]["mean"] == pytest.approx(0.1)
    assert core["text_vs_reference"]["high"] - core["text_vs_reference"]["low"] == pytest.approx(0)
    assert core["text"]["high"] - core["text"]["low"] > 0.5
    assert core["per_concept"]["c"]["text"] == pytest.approx(1.0)
    assert core["per_prompt"]["q"]["identity"] == pytest.approx(0.5)
    assert np.isnan(core["text_seed_sd"])  # one seed: no spread to report
    table = benchmark.format_markdown(summary, ["p", "q"], "ti")
    assert "| ti | 0.500 [-0.494, 1.494] | 0.500 [-0.494, 1.494] | (reference) |" in table
    assert "| +0.000 [+0.000, +0.000] {+0.000, +0.000} p 1.000 / 1.000 | +0.100 [+0.100, +0.100]" \
        in table


def test_summary_averages_seeds_first_and_corrects_for_multiplicity():
    rng = np.random.default_rng(0)
    methods, concepts, seeds, prompts = ["ti", "core", "other"], 6, 3, 2
    identity = rng.uniform(size=(3, concepts, seeds, prompts))
    text = rng.uniform(size=(3, concepts, seeds, prompts))
    text[1] += 0.3  # core's text is clearly better; other is noise
    summary = benchmark.summarize(identity, text, methods, [f"c{i}" for i in range(concepts)],
                                  ["p", "q"], reference="ti")
    # By hand: per concept the mean over seeds and prompts, then paired t over concepts.
    per_concept = {k: v.mean(axis=(2, 3)) for k, v in (("identity", identity), ("text", text))}
    raw = {}
    for m, method in ((1, "core"), (2, "other")):
        for key in ("identity", "text"):
            d = per_concept[key][m] - per_concept[key][0]
            got = summary[method][f"{key}_vs_reference"]
            raw[(method, key)] = stats.ttest_rel(per_concept[key][m], per_concept[key][0]).pvalue
            assert got["p"] == pytest.approx(raw[(method, key)], rel=1e-9)
            assert got["mean"] == pytest.approx(d.mean())
            # Bonferroni: 4 comparisons, so a 1 - 0.05 / 4 two-sided t interval.
            half = stats.t.ppf(1 - 0.05 / 8, concepts - 1) * d.std(ddof=1) / np.sqrt(concepts)
            assert got["low_adjusted"] == pytest.approx(d.mean() - half)
            assert got["high_adjusted"] == pytest.approx(d.mean() + half)
            assert got["high_adjusted"] - got["low_adjusted"] > got["high"] - got["low"]
        sd = text[m].mean(-1).std(-1, ddof=1).mean()
        assert summary[method]["text_seed_sd"] == pytest.approx(sd)
    # Holm by hand: sort the 4 raw p, multiply by 4, 3, 2, 1, running maximum, capped at 1.
    order = sorted(raw, key=raw.get)
    running = 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * raw[key]))
        assert summary[key[0]][f"{key[1]}_vs_reference"]["p_holm"] == pytest.approx(running)
    assert summary["core"]["text_vs_reference"]["p_holm"] < 0.05
    assert np.isnan(summary["ti"]["text_vs_reference"]["p"])
    assert "Holm-adjusted over the 4 comparisons" in benchmark.correction_note(methods, "ti")


def test_holm_matches_a_plain_writing():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # Known p sorted: 0.005, 0.01, 0.03, 0.04 (m = 4): x4, x3, x2, x1 with a running max.
    expected = [0.03, 0.06, 0.06, float("nan"), 0.02]
    np.testing.assert_allclose(holm(p), expected)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_methods_are_named_sweep_settings(tmp_path):
    config = _toy_benchmark_config()
    assert len(config.sweep.concepts) >= 10 and len(config.sweep.settings) == 8
    del config["benchmark"]
    runs = expand_runs(config, tmp_path)
    assert len(runs) == len(config.sweep.concepts) * len(config.sweep.settings)
    by_name = {r.name: r.config for r in runs}
    ti, core = by_name["green_dotted_star__ti"], by_name["green_dotted_star__core"]
    assert ti.stage1.methods == ("textual_inversion",)  # no regularizer, no norm hold
    assert core.stage1.lambda_emb > 0 and core.stage1.lambda_attn > 0
    assert by_name["green_dotted_star__core_stage2"].stage2.steps > 0
    assert by_name["pink_striped_moon__core"].concept.super_category == "circle"
    assert core.concept.images == "toyworld:green dotted star"
    config.sweep.settings = (dict(name="a", overrides={"data.resolution": 64}),)
    with pytest.raises(InputError, match="the model, data and concepts are fixed"):
        expand_runs(config, tmp_path)
    config.sweep.settings = (dict(name="a", overrides={}), dict(name="a", overrides={}))
    with pytest.raises(InputError, match="unique, non-empty names"):
        expand_runs(config, tmp_path)


def test_bad_benchmark_inputs_fail_before_anything_is_written(tmp_path):
    config = _toy_benchmark_config()
    config.benchmark.classifier = str(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="benchmark.classifier .* does not exist"):
        benchmark.plan(config, tmp_path / "work")
    (tmp_path / "classifier.safetensors").touch()
    config.benchmark.classifier = str(tmp_path / "classifier.safetensors")
    config.model.path = str(tmp_path)
    config.benchmark.reference = "dreambooth"
    with pytest.raises(InputError, match="benchmark.reference 'dreambooth' is not one of"):
        benchmark.plan(config, tmp_path / "work")
    config.benchmark.reference = "ti"
    config.sweep.concepts = (dict(name="cat", images="builtin:chelsea", super_category="cat",
                                  templates="animate"),)
    with pytest.raises(InputError, match="must be a toy-world identity"):
        benchmark.plan(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_run_trained_with_other_settings_is_refused(tmp_path):
    config = _toy_benchmark_config()
    del config["benchmark"]
    run = expand_runs(config, tmp_path)[0]
    check_same_training(run, tmp_path)  # nothing there yet
    run.folder.mkdir(parents=True)
    (run.folder / "config.json").write_text(run.config.to_json())
    check_same_training(run, tmp_path)
    run.config.stage1.learning_rate = 1e-3
    run.config.concept.caption = "a photo of a {}"
    with pytest.raises(InputError, match=r"other settings \(concept.caption, "
                                         r"stage1.learning_rate\); use another workdir"):
        check_same_training(run, tmp_path)


# --- Issue 16: held-out prompts, seeds, the lambda search ----------------------------------------


def _config(name: str, *args: str) -> ml_collections.ConfigDict:
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize("name", ["toy_benchmark_v2.py", "toy_lambda_search.py"])
def test_evaluation_prompts_are_no_regularization_template(name):
    config = _config(name)
    templates = benchmark.regularization_templates(config)
    assert len(templates) == 49  # templates.txt: every pretraining context
    asked = {tuple(sorted(parse_caption(t.format("")).items())) for t in templates}
    for prompt in config.benchmark.prompts:
        for colour in COLOURS:
            context = prompt.format("{}", recolour=colour)
            assert context not in templates
            assert tuple(sorted(parse_caption(context.format("")).items())) not in asked
    assert not config.benchmark.get("prompts_may_repeat_templates", False)
    benchmark.check_held_out(config.benchmark.prompts, templates)


@pytest.mark.parametrize("prompt, repeats", [
    ("a {} on grass, sketch style", "a {} on grass, sketch style"),  # verbatim
    ("a {}, sketch style on grass", "a {} on grass, sketch style"),  # same asks, other words
    ("a {} on the left", "a {} on the left"),
])
def test_a_prompt_that_repeats_a_template_is_refused_in_one_line(prompt, repeats):
    templates = benchmark.regularization_templates(_config("toy_benchmark_v2.py"))
    with pytest.raises(InputError) as err:
        benchmark.check_held_out(["a small {} on grass", prompt], templates)
    assert str(err.value).count("\n") == 0
    assert f"benchmark prompt {prompt!r} repeats the regularization template {repeats!r}" in str(
        err.value)
    benchmark.check_held_out(["a {recolour} {} on grass", "a large {} at night"], templates)


def test_the_command_refuses_template_prompts_unless_the_config_says_so(tmp_path):
    config = _config("toy_benchmark_v2.py", "main")
    (tmp_path / "model").mkdir()
    (tmp_path / "classifier.safetensors").touch()
    config.model.path = str(tmp_path / "model")
    config.benchmark.classifier = str(tmp_path / "classifier.safetensors")
    config.benchmark.prompts = ("a {} in the snow",)
    with pytest.raises(InputError, match="repeats the regularization template"):
        benchmark.plan(config, tmp_path / "work")
    v1 = _toy_benchmark_config()  # the issue-8 table keeps its prompts, and says so
    assert v1.benchmark.prompts_may_repeat_templates


def test_v2_config_without_its_model_stops_in_one_line(tmp_path):
    config = _config("toy_benchmark_v2.py")
    config.model.path = str(tmp_path / "toy_model_v2")
    with pytest.raises(InputError) as err:
        benchmark.plan(config, tmp_path / "work")
    message = str(err.value)
    assert "\n" not in message and "toy_model_v2" in message and "--export" in message
    assert not (tmp_path / "work").exists()


def test_test_and_validation_concepts_are_disjoint_and_the_search_reads_validation_only():
    assert len(TEST_IDENTITIES) == 32 and len(VALIDATION_IDENTITIES) == 16
    assert not set(TEST_IDENTITIES) & set(VALIDATION_IDENTITIES)
    main, search = _config("toy_benchmark_v2.py"), _config("toy_lambda_search.py")
    validation = {f"toyworld:{i.words}" for i in VALIDATION_IDENTITIES}
    test = {f"toyworld:{i.words}" for i in TEST_IDENTITIES}
    assert {c["images"] for c in search.sweep.concepts} == validation
    assert {c["images"] for c in main.sweep.concepts} == test
    assert not main.benchmark.get("lambda_search")


def test_the_search_refuses_a_test_concept(tmp_path):
    config = _config("toy_lambda_search.py")
    (tmp_path / "model").mkdir()
    (tmp_path / "classifier.safetensors").touch()
    config.model.path = str(tmp_path / "model")
    config.benchmark.classifier = str(tmp_path / "classifier.safetensors")
    config.sweep.concepts = (*config.sweep.concepts[:2],
                             _config("toy_benchmark_v2.py").sweep.concepts[0])
    with pytest.raises(InputError, match=f"concept '{TEST_IDENTITIES[0].words}' is a test "
                                         "concept; the search may only use validation"):
        benchmark.plan(config, tmp_path / "work")


def test_search_curves_name_its_settings_and_lambdas_rise():
    config = _config("toy_lambda_search.py")
    names = {s["name"] for s in config.sweep.settings}
    search = config.benchmark.lambda_search
    assert search.reference in names
    assert {c["method"] for c in search.curves} == {"core", "core_pairwise", "core_hinge"}
    for curve in search.curves:
        assert {name for name, _ in curve["points"]} <= names
        values = [value for _, value in curve["points"]]
        assert values == sorted(values) and len(set(values)) == len(values) >= 4


def test_choose_lambda_follows_the_stated_rule():
    points = [(1.0, 0.60, 0.50), (10.0, 0.58, 0.60), (100.0, 0.50, 0.80), (30.0, 0.56, 0.60)]
    chosen = benchmark.choose_lambda(points, reference_identity=0.60, tolerance=0.05)
    # 100 has the best text but loses 0.10 identity; 10 and 30 tie on text: the smaller wins.
    assert chosen["lambda"] == 10.0 and chosen["identity_floor"] == pytest.approx(0.55)
    assert benchmark.choose_lambda(points, 0.60, 0.2)["lambda"] == 100.0
    none = benchmark.choose_lambda(points, 0.90, 0.05)
    assert none["lambda"] is None and "no lambda keeps identity" in none["why"]


def test_lambda_search_writes_a_curve_per_method_and_the_chosen_overrides(tmp_path):
    config = _config("toy_lambda_search.py")
    # Made-up means: text rises with lambda, identity falls; TI at identity 0.6.
    methods = {"ti": {"identity": {"mean": 0.6}, "text": {"mean": 0.4}}}
    for curve in config.benchmark.lambda_search.curves:
        for rank, (name, _) in enumerate(curve["points"]):
            methods[name] = {"identity": {"mean": 0.62 - 0.02 * rank},
                             "text": {"mean": 0.4 + 0.05 * rank}}
    search = benchmark.lambda_search_results(config, methods, tmp_path)
    assert "at least ti's minus 0.05" in search["rule"]
    core = search["methods"]["core"]
    # Identity 0.62, 0.60, 0.58, 0.56, 0.54, ...: the floor 0.55 keeps the first four.
    assert core["chosen"]["lambda"] == 100.0 and core["chosen"]["setting"] == "core_x100"
    assert core["chosen"]["overrides"]["stage1.lambda_attn"] == pytest.approx(5.0)
    assert [pt["lambda"] for pt in core["points"]] == [1, 10, 30, 100, 300, 1000]
    for method in ("core", "core_pairwise", "core_hinge"):
        png = tmp_path / f"lambda_curve_{method}.png"
        assert search["methods"][method]["plot"] == str(png)
        assert Image.open(png).size[0] > 100


def test_seeds_are_an_axis_of_distinct_runs(tmp_path):
    config = _config("toy_benchmark_v2.py", "main")
    assert len(config.benchmark.seeds) >= 3
    training = benchmark._training_config(config)
    runs = expand_runs(training, tmp_path)
    assert len(runs) == 32 * 2 * len(config.benchmark.seeds)
    assert len({r.name for r in runs}) == len(runs)
    first = [r for r in runs if r.name.startswith(config.sweep.concepts[0]["name"] + "__ti")]
    assert [r.config.seed for r in first] == list(config.benchmark.seeds)
    sampling = [benchmark.sample_seed(config, r.config.seed) for r in first]
    assert len(set(sampling)) == len(sampling)
    # The seed is no part of a run's program: the seeds of one method pack together.
    assert len({group_key(r) for r in first}) == 1
    # Without benchmark.seeds (the issue-8 config): one run per pair at `seed`, as before.
    v1 = _toy_benchmark_config()
    assert benchmark.benchmark_seeds(v1) == [v1.seed]
    assert not benchmark._training_config(v1).sweep.grid


# --- The command, end to end ---------------------------------------------------------------------

MINIATURE = """
import importlib.util

_spec = importlib.util.spec_from_file_location("toy_benchmark", {config!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config():
    c = _module.get_config()
    c.sweep.concepts = c.sweep.concepts[:2]
    c.sweep.settings = tuple(s for s in c.sweep.settings if s["name"] in ("ti", "core_stage2"))
    for s in c.sweep.settings:
        if s["name"] == "core_stage2":
            s["overrides"]["stage2.steps"] = 2
    c.sweep.pack = 2
    c.stage1.steps = 4
    c.stage1.rescale_start, c.stage1.rescale_end = 2, 3
    c.log_every, c.checkpoint_every = 1, 2
    c.benchmark.prompts = ("a {{}} on grass, sketch style", "a {{recolour}} {{}}")
    c.benchmark.images_per_prompt = 2
    c.benchmark.steps = 3
    return c
"""


@pytest.fixture(scope="module")
def random_assets(tmp_path_factory) -> tuple[Path, Path]:
    """A toy model folder and a classifier file of the shipped kinds, with random weights."""
    folder = tmp_path_factory.mktemp("toy_assets")
    text_encoder, unet, params = toy_model.init_models(seed=0)
    model_dir = toy_model.save_toy_model(folder / "toy_model", text_encoder, unet, params, {})
    module = attribute_classifier.AttributeClassifier()
    res = attribute_classifier.RESOLUTION
    classifier_params = module.init(jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"]
    classifier_path = attribute_classifier.save_params(
        folder / "classifier.safetensors", classifier_params
    )
    return model_dir, classifier_path


def _benchmark(workdir: Path, config: Path, assets: tuple[Path, Path], *extra: str,
               timeout: float = 600):
    model_dir, classifier_path = assets
    command = [
        sys.executable, "-m", "core_jax", "benchmark", "--config", str(config),
        "--workdir", str(workdir), f"--config.model.path={model_dir}",
        f"--config.benchmark.classifier={classifier_path}", *extra,
    ]
    # One CPU device: the miniature's batch of 4 need not split over the tests' 8.
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": ""})


def _scores_by_hand(workdir: Path, concepts: dict, classifier_path: Path) -> dict:
    """{method: {"identity" | "text": {concept: score}}} for the miniature, from the saved
    samples: the classifier is run on them here, and what each prompt asks and which identity
    attributes it keeps are written out by hand."""
    prompts = ("a {} on grass, sketch style", "a {recolour} {}")
    params = attribute_classifier.load_params(classifier_path)
    module = attribute_classifier.AttributeClassifier()
    out: dict = {}
    for method in ("ti", "core_stage2"):
        out[method] = {"identity": {}, "text": {}}
        for concept, words in concepts.items():
            colour, pattern, shape = words.split()
            wanted = {  # template: (asked attributes, identity attributes kept)
                prompts[0]: ({"background": "grass", "style": "sketch"},
                             {"shape": shape, "colour": colour, "pattern": pattern}),
                prompts[1]: ({"colour": benchmark.contrast_colour(colour)},
                             {"shape": shape, "pattern": pattern}),
            }
            folder = workdir / "runs" / f"{concept}__{method}"
            scores = json.loads((folder / benchmark.SCORES_FILE).read_text())["prompts"]
            with np.load(folder / benchmark.SAMPLES_FILE) as f:
                samples = f["samples"]  # [prompts, images per prompt, 32, 32, 3]
            k = samples.shape[1]
            logits = module.apply(
                {"params": params},
                attribute_classifier.to_classifier_resolution(samples.reshape(-1, 32, 32, 3)),
            )
            identity, text = [], []
            for i, template in enumerate(prompts):
                asks, kept = wanted[template]
                record = scores[template]
                assert record["asks"] == asks and record["identity_checked"] == kept
                assert len(record["drawn"]) == k
                for j, drawn in enumerate(record["drawn"]):
                    for attribute, value in drawn.items():
                        # The recorded reading is the classifier's argmax on the saved image.
                        # Here it runs in another batch (other blocking of its sums): logits of
                        # O(10) may move by ~1e-5, so a reading within 1e-4 of the top counts.
                        row = np.asarray(logits[attribute][i * k + j])
                        assert row[ATTRIBUTES[attribute].index(value)] >= row.max() - 1e-4
                    identity.append(np.mean([drawn[a] == v for a, v in kept.items()]))
                    text.append(np.mean([drawn[a] == v for a, v in asks.items()]))
                # Per image, the fraction of checked attributes drawn as asked.
                np.testing.assert_allclose(record["identity"], identity[-k:], rtol=0, atol=1e-12)
                np.testing.assert_allclose(record["text"], text[-k:], rtol=0, atol=1e-12)
            # A concept's score: the mean over its prompts of the mean over their images; every
            # prompt has k images, so the plain mean of all of them.
            out[method]["identity"][concept] = float(np.mean(identity))
            out[method]["text"][concept] = float(np.mean(text))
    return out


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_resumes(tmp_path, random_assets):
    config = tmp_path / "miniature.py"
    config.write_text(MINIATURE.format(config=str(ROOT / "configs/toy_benchmark.py")))
    workdir = tmp_path / "work"
    first = _benchmark(workdir, config, random_assets)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "scored 4/4" in first.stdout and "| core_stage2 |" in first.stdout

    results = json.loads((workdir / "results.json").read_text())
    assert set(results["methods"]) == {"ti", "core_stage2"}
    # One program per (method group, stage): TI's stage 1, CoRe's stage 1 and its stage 2.
    assert results["compilations"] == 3
    expected = _scores_by_hand(workdir, results["concepts"], random_assets[1])
    for name, method in results["methods"].items():
        assert set(method["per_concept"]) == {"green_dotted_star", "blue_striped_heart"}
        for key in ("identity", "text"):
            per_concept = expected[name][key]
            assert method[key]["n"] == 2
            # Means of a few fractions like 2/3 in float64: rounding ~1e-16.
            assert method[key]["mean"] == pytest.approx(np.mean(list(per_concept.values())),
                                                        abs=1e-12)
            for concept, value in per_concept.items():
                assert method["per_concept"][concept][key] == pytest.approx(value, abs=1e-12)
            paired = [per_concept[c] - expected["ti"][key][c] for c in per_concept]
            assert method[f"{key}_vs_reference"]["mean"] == pytest.approx(np.mean(paired),
                                                                          abs=1e-12)
    assert results["methods"]["ti"]["text_vs_reference"]["mean"] == 0
    markdown = (workdir / "results.md").read_text()
    assert "| ti |" in markdown and "`a {recolour} {}`" in markdown
    for method in ("ti", "core_stage2"):
        grid = workdir / f"grid_{method}.png"
        # 2 concepts x (1 photo + 2 prompts) cells of 32 pixels, upscaled, 2-pixel gaps.
        cell = 32 * benchmark.GRID_UPSCALE
        assert Image.open(grid).size == (3 * cell + 4, 2 * cell + 2)
    scores = json.loads(
        (workdir / "runs/green_dotted_star__core_stage2" / benchmark.SCORES_FILE).read_text()
    )
    recolour = scores["prompts"]["a {recolour} {}"]
    assert recolour["asks"] == {"colour": "pink"} and len(recolour["identity"]) == 2
    assert (workdir / "runs/green_dotted_star__core_stage2/unet/config.json").is_file()

    again = _benchmark(workdir, config, random_assets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 2 and "every run is scored already" in again.stdout
    assert json.loads((workdir / "results.json").read_text())["methods"] == results["methods"]

    changed = _benchmark(workdir, config, random_assets, "--config.stage1.steps=5")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"core-jax: {workdir} holds run green_dotted_star__ti trained with other settings "
        "(stage1.steps); use another workdir or delete that run"
    ]


MINIATURE_V2 = """
import importlib.util

_spec = importlib.util.spec_from_file_location("toy_benchmark_v2", {config!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config():
    c = _module.get_config("main")
    c.sweep.concepts = c.sweep.concepts[:2]
    c.benchmark.seeds = (0, 1)
    c.sweep.pack = 4
    c.stage1.steps = 4
    c.stage1.rescale_start, c.stage1.rescale_end = 2, 3
    c.log_every, c.checkpoint_every = 1, 4
    c.benchmark.prompts = ("a small {{}} on grass", "a {{recolour}} {{}}, sketch style")
    c.benchmark.images_per_prompt = 2
    c.benchmark.steps = 3
    return c
"""


@pytest.mark.slow
def test_v2_benchmark_with_seeds_writes_every_artifact(tmp_path, random_assets):
    """2 concepts x TI, CoRe x 2 seeds x 2 held-out prompts on a random (v1-shaped) toy model:
    the seed axis gives distinct runs and sampling seeds, the artifacts are written, the table
    reports Holm, and the drift of every run is measured."""
    config = tmp_path / "miniature_v2.py"
    config.write_text(MINIATURE_V2.format(config=str(ROOT / "configs/toy_benchmark_v2.py")))
    workdir = tmp_path / "work"
    started = time.perf_counter()
    # 8 runs, 8 scorings, 8 drift measurements, 2 programs: 13 min here under load 8-17.
    done = _benchmark(workdir, config, random_assets, timeout=1800)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 8/8" in done.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == {"training": [0, 1], "sampling": [0, 1]}
    assert results["unfilled_lambdas"] == ["core"] and results["prompts_held_out"]
    runs = sorted(p.name for p in (workdir / "runs").iterdir())
    assert len(runs) == 8 and all(",seed=" in r for r in runs)
    # One program per method (the seeds of a method pack together): TI's and CoRe's stage 1.
    assert results["compilations"] == 2
    rows = list(csv.DictReader((workdir / benchmark.IMAGE_SCORES_FILE).open()))
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # concepts x methods x seeds x prompts x images
    assert {(r["training_seed"], r["sample_seed"]) for r in rows} == {("0", "0"), ("1", "1")}
    # The per-concept number is the mean over seeds, prompts and images of the per-image rows.
    core = results["methods"]["core"]
    for concept in results["concepts"]:
        mine = [float(r["text"]) for r in rows if r["concept"] == concept
                and r["method"] == "core"]
        assert core["per_concept"][concept]["text"] == pytest.approx(np.mean(mine), abs=1e-12)
    assert {"p", "p_holm", "low_adjusted", "high_adjusted"} <= set(core["text_vs_reference"])
    # Trained with different seeds, the runs learned different words.
    assert runs[0].endswith(",seed=0") and runs[1] == runs[0][:-1] + "1"
    learned = [(workdir / "runs" / r / "learned_embeds.safetensors").read_bytes()
               for r in runs[:2]]
    assert learned[0] != learned[1]
    for run in runs:
        folder = workdir / "runs" / run
        assert json.loads((folder / "config.json").read_text())["seed"] == int(run[-1])
        measured = json.loads((folder / benchmark.DRIFT_FILE).read_text())
        assert 0.0 <= measured["token_share"] <= 1.0 and measured["emb"] >= 0.0
    assert set(results["drift"]["ti"]) >= {"emb", "attn", "token_share", "emb_vs_reference"}
    markdown = (workdir / "results.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "# Toy-world method table" and lines[2].startswith(
        "Runtime of this command: ")
    assert "Holm-adjusted" in markdown and "Bonferroni-adjusted" in markdown
    assert "placeholder lambdas" in markdown and "Context drift" in markdown
    print(f"v2 miniature: {seconds:.0f} s for 8 runs of 4 steps ({results['seconds']})")

"""The lambda search for configs/toy_benchmark_v2.py: each regularized method over a grid of
its weights, on the 16 VALIDATION concepts only (issue 16).

What it runs: the benchmark machinery (`core-jax benchmark`) with `benchmark.lambda_search`
set: every (validation concept, setting, seed) as one stage-1 run on the toy model v2, sampled
and scored on the same held-out prompts as the main table. Then, per method, the
identity-vs-text curve over lambda (means over the validation concepts and seeds) is drawn to
lambda_curve_<method>.png, and lambda_search.json records the chosen lambda by this rule:

    the lambda with the highest mean text alignment whose mean identity is at least TI's minus
    IDENTITY_TOLERANCE (0.05); ties go to the smaller lambda; none if no lambda keeps identity.

Why that rule: CoRe's claim is better text alignment at no cost in identity, so the search may
buy text only with identity TI already has; 0.05 is the identity margin issue 16 asks the main
table to resolve. The test concepts are never read: the command refuses a search naming one.

Grids: CoRe's two weights move together, as multiples of the paper's (lambda_emb 1.5e-4,
lambda_attn 0.05; the v1 table used 100x): x1, x10, x30, x100, x300, x1000. The thesis' pairwise
and hinge terms (on top of CoRe at its v1 weights) over 0.01, 0.03, 0.1, 0.3. CoRe's ablations
take CoRe's chosen weights (no search of their own).

Command:
    core-jax benchmark --config configs/toy_lambda_search.py --workdir runs/toy_lambda_search
Then copy each method's "chosen"."overrides" from runs/toy_lambda_search/lambda_search.json into
configs/toy_benchmark_v2.py's LAMBDAS and drop it from UNFILLED.

Time here (2-core CPU) [UNVERIFIED: estimated as configs/toy_benchmark_v2.py's docstring
explains, 0.28-0.83 s per run-step and 40 s of sampling, scoring and drift per run]: 15
settings x 16 concepts x 2 seeds = 480 runs of 200 steps, 7.5-22 h of training and 5.3 h of
sampling, scoring and drift; it resumes where it stopped, so it can run over several sessions.

What it should reach: a curve per method in lambda_curve_<method>.png that rises in text
alignment and falls in identity as lambda grows (if a curve is flat, the grid does not reach
the weights where the term acts), and a chosen lambda per method in lambda_search.json.
"""

import importlib.util
from pathlib import Path

import ml_collections

from core_jax.toyworld.world import VALIDATION_IDENTITIES

_spec = importlib.util.spec_from_file_location(
    "toy_benchmark_v2", Path(__file__).with_name("toy_benchmark_v2.py")
)
_v2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_v2)

SEEDS = (0, 1)
IDENTITY_TOLERANCE = 0.05
PAPER = {"stage1.lambda_emb": 1.5e-4, "stage1.lambda_attn": 0.05}
CORE_SCALES = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
THESIS_LAMBDAS = (0.01, 0.03, 0.1, 0.3)


def _settings() -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """The named sweep settings and the curves that read them."""
    ti = next(s for s in _v2.method_settings(_v2.LAMBDAS) if s["name"] == "ti")
    settings, curves = [ti], []
    core_points = []
    for scale in CORE_SCALES:
        name = f"core_x{scale:g}"
        settings.append(dict(name=name, overrides={k: v * scale for k, v in PAPER.items()}))
        core_points.append((name, scale))
    curves.append(dict(method="core", points=tuple(core_points)))
    core_v1 = _v2.LAMBDAS["core"]
    for method, key in (("core_pairwise", "stage1.lambda_pairwise"),
                        ("core_hinge", "stage1.lambda_hinge")):
        points = []
        for value in THESIS_LAMBDAS:
            name = f"{method}_{value:g}"
            settings.append(dict(name=name, overrides={**core_v1, key: value}))
            points.append((name, value))
        curves.append(dict(method=method, points=tuple(points)))
    return tuple(settings), tuple(curves)


def get_config():
    c = _v2.base(VALIDATION_IDENTITIES)
    c.sweep.settings, curves = _settings()
    c.benchmark.seeds = SEEDS
    c.benchmark.lambda_search = ml_collections.ConfigDict(dict(
        reference="ti", identity_tolerance=IDENTITY_TOLERANCE, curves=curves,
    ))
    return c

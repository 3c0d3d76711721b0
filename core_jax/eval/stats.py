"""Intervals and multiple-comparison corrections for method tables: subjects (concepts) are the
independent units, so every interval is over per-subject means."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean and Student's t confidence interval of independent values; with fewer than two
    values the interval is unknown (NaN)."""
    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": len(x)}
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(x)}


def paired_p(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided p of a paired t-test (mean difference 0); NaN below two pairs, 1 when every
    difference is 0."""
    d = np.asarray(differences, np.float64)
    if len(d) < 2:
        return math.nan
    if not d.std(ddof=1):
        return 1.0 if not d.mean() else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order; NaN stays NaN and is not counted): reject
    where adjusted p < alpha keeps the family-wise error rate at alpha."""
    p = np.asarray(p_values, np.float64)
    known = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    running = 0.0
    for rank, i in enumerate(known[np.argsort(p[known], kind="stable")]):
        running = max(running, min(1.0, (len(known) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()

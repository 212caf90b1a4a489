"""Small statistics for comparing runs across seeds: t intervals, Welch's and the paired t test, Holm's
adjustment, verdicts and curve reads.

Pure functions on plain sequences (numpy + scipy); nothing here knows about runs or files. scipy does the
t distribution work; the functions here add the guards scipy lacks for the tiny samples a study has
(fewer than two values, or values without spread).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

NAN = math.nan


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half width of the Student-t confidence interval of the mean).

    The half width is NaN for fewer than two values (no spread to estimate) and 0 for values without
    spread; the mean is NaN for none.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return NAN, NAN
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, NAN
    sem = float(arr.std(ddof=1) / math.sqrt(arr.size))
    if sem == 0:
        return mean, 0.0  # scipy returns a NaN interval for scale 0; the mean is exact here
    low, high = sps.t.interval(confidence, arr.size - 1, loc=mean, scale=sem)
    return mean, float(high - mean)


@dataclass(frozen=True)
class TTestResult:
    """A two-sided t test of the difference mean(a) - mean(b) (Welch) or mean(a - b) (paired)."""

    test: str  # "paired" or "Welch"
    diff: float
    ci_low: float  # confidence interval of diff (95 % by default)
    ci_high: float
    t: float
    dof: float
    p_value: float


def _exact(test: str, diff: float, dof: float) -> TTestResult:
    """No spread at all: the difference is exact. p is the limit of the test as the spread shrinks to
    zero: 1 when the means are equal (t = 0), 0 when they differ (t = +-inf)."""
    if diff == 0:
        return TTestResult(test, diff, diff, diff, 0.0, dof, 1.0)
    return TTestResult(test, diff, diff, diff, math.copysign(math.inf, diff), dof, 0.0)


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult:
    """Welch's unequal-variance t test and the Welch-Satterthwaite interval of mean(a) - mean(b).

    Either group with fewer than two values: every field NaN except `diff` (NaN too if a group is empty).
    Both groups without spread: see `_exact`, with dof NaN (Welch-Satterthwaite divides 0 by 0).
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(xa.mean() - xb.mean()) if xa.size and xb.size else NAN
    if xa.size < 2 or xb.size < 2:
        return TTestResult("Welch", diff, NAN, NAN, NAN, NAN, NAN)
    if xa.var(ddof=1) == 0 and xb.var(ddof=1) == 0:
        return _exact("Welch", diff, NAN)
    with warnings.catch_warnings():  # one group without spread is fine for Welch; scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        result = sps.ttest_ind(xa, xb, equal_var=False)
    low, high = result.confidence_interval(confidence)
    return TTestResult("Welch", diff, float(low), float(high), float(result.statistic), float(result.df),
                      float(result.pvalue))


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult:
    """Paired t test on the differences a[i] - b[i] (a[i] and b[i] share a seed): their mean, t interval, p.

    Fewer than two pairs: every field NaN except `diff` (NaN for none). Differences without spread: see
    `_exact`, with dof = pairs - 1.
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired_test needs as many a as b values, got {xa.size} and {xb.size}")
    d = xa - xb
    diff = float(d.mean()) if d.size else NAN
    if d.size < 2:
        return TTestResult("paired", diff, NAN, NAN, NAN, NAN, NAN)
    if d.var(ddof=1) == 0:
        return _exact("paired", diff, float(d.size - 1))
    result = sps.ttest_rel(xa, xb)
    low, high = result.confidence_interval(confidence)
    return TTestResult("paired", diff, float(low), float(high), float(result.statistic), float(result.df),
                      float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    The k-th smallest of m p-values is multiplied by (m - k + 1); adjusted values are then made
    monotone (never below an adjusted value of a smaller p) and capped at 1. NaN entries (tests not
    run) are passed through and do not count in m. Rejecting where adjusted p < alpha controls the
    family-wise error rate at alpha.
    """
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [float(p) for p in p_values]
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(diff: float, p_value: float, alpha: float = 0.05, higher_is_better: bool = False) -> str:
    """How A compares with B given diff = A - B and its p-value, on a metric where lower is better (an
    error) unless `higher_is_better` (an accuracy)."""
    gain = diff if higher_is_better else -diff
    if p_value < alpha and gain > 0:  # NaN p compares False: no verdict without a test
        return "better"
    if p_value < alpha and gain < 0:
        return "worse"
    return "no detectable difference"


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """The curve (xs, ys) read at x, interpolating linearly in log(y) between the bracketing points.

    Errors fall roughly geometrically during training, so log-linear reads are the fairer guess.
    NaN when x lies before the first or after the last point (no extrapolation). Points are
    sorted by x first; if a bracketing y is not positive, that segment is read linearly in y.
    """
    xa, ya = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if xa.size == 0 or not math.isfinite(x):
        return NAN
    order = np.argsort(xa, kind="stable")
    xa, ya = xa[order], ya[order]
    if x < xa[0] or x > xa[-1]:
        return NAN
    hi = int(np.searchsorted(xa, x, side="left"))  # first point with xs >= x
    if xa[hi] == x:
        return float(ya[hi])
    lo = hi - 1
    frac = (x - xa[lo]) / (xa[hi] - xa[lo])
    y0, y1 = ya[lo], ya[hi]
    if y0 > 0 and y1 > 0:
        return float(math.exp(math.log(y0) + frac * (math.log(y1) - math.log(y0))))
    return float(y0 + frac * (y1 - y0))

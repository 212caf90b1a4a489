"""Small statistics for comparing runs across seeds: t intervals, Welch's test, verdicts, curve reads.

Pure functions on plain sequences (numpy + scipy); nothing here knows about runs or files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

NAN = math.nan


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half width of the Student-t confidence interval of the mean).

    The half width is NaN for fewer than two values (no spread to estimate); the mean is NaN for none.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return NAN, NAN
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, NAN
    sem = arr.std(ddof=1) / math.sqrt(arr.size)
    return mean, float(sps.t.ppf((1 + confidence) / 2, arr.size - 1) * sem)


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t test of mean(a) - mean(b)."""

    diff: float  # mean(a) - mean(b)
    ci_low: float  # Welch-Satterthwaite confidence interval of diff (95 % by default)
    ci_high: float
    t: float
    dof: float
    p_value: float  # two-sided


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> WelchResult:
    """Welch's t test and the confidence interval of mean(a) - mean(b).

    Either group with fewer than two values: every field NaN except `diff` (NaN too if a group is empty).
    Both groups without spread (standard error 0): the difference is exact, so the interval is
    [diff, diff], dof is NaN, and p_value is 1.0 when the means are equal (t = 0) or 0.0 when they
    differ (t = +-inf) -- the limit of the test as the variances shrink to zero.
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(xa.mean() - xb.mean()) if xa.size and xb.size else NAN
    if xa.size < 2 or xb.size < 2:
        return WelchResult(diff, NAN, NAN, NAN, NAN, NAN)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size  # squared standard errors
    se2 = va + vb
    if se2 == 0:
        if diff == 0:
            return WelchResult(diff, diff, diff, 0.0, NAN, 1.0)
        return WelchResult(diff, diff, diff, math.copysign(math.inf, diff), NAN, 0.0)
    se = math.sqrt(se2)
    dof = se2**2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))  # Welch-Satterthwaite
    t = diff / se
    p_value = float(2 * sps.t.sf(abs(t), dof))
    half = float(sps.t.ppf((1 + confidence) / 2, dof) * se)
    return WelchResult(diff, diff - half, diff + half, float(t), float(dof), p_value)


def verdict(result: WelchResult, alpha: float = 0.05) -> str:
    """For an error metric (lower is better), how group A compares with group B."""
    if result.p_value < alpha and result.diff < 0:  # NaN p compares False: no verdict without a test
        return "better"
    if result.p_value < alpha and result.diff > 0:
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

"""Small statistics for comparing runs across seeds: t intervals, Welch's and the paired t test, Holm's
adjustment, verdicts, curve reads, and what a comparison can tell: power, the minimum detectable effect,
equivalence (two one-sided tests) and the seeds a study needs.

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
from scipy import optimize
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

    test: str  # "paired" or "Welch"; "sign-flip" or "permutation" (exact) when the values have no spread
    diff: float
    ci_low: float  # confidence interval of diff (95 % by default)
    ci_high: float
    t: float
    dof: float
    p_value: float


def _no_spread(test: str, diff: float, dof: float, p_apart: float) -> TTestResult:
    """Values without spread: t is undefined (0 / 0 or d / 0), so p comes from the exact permutation test
    instead: `p_apart` when the means differ (the share of equally likely relabellings as extreme as the
    observed one), 1 when they do not. On a discrete score (an accuracy over 64 problems) two seeds can tie
    by chance; t's limit, p = 0, would call that certain. No t interval exists, so the CI is NaN."""
    return TTestResult(test, diff, NAN, NAN, NAN, dof, 1.0 if diff == 0 else p_apart)


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult:
    """Welch's unequal-variance t test and the Welch-Satterthwaite interval of mean(a) - mean(b).

    Either group with fewer than two values: every field NaN except `diff` (NaN too if a group is empty).
    Both groups without spread: see `_no_spread` (test "permutation": of the C(n_a + n_b, n_a) relabellings
    only the observed one, and its swap when the groups are the same size, are as extreme), dof NaN
    (Welch-Satterthwaite divides 0 by 0).
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(xa.mean() - xb.mean()) if xa.size and xb.size else NAN
    if xa.size < 2 or xb.size < 2:
        return TTestResult("Welch", diff, NAN, NAN, NAN, NAN, NAN)
    if xa.var(ddof=1) == 0 and xb.var(ddof=1) == 0:
        extreme = 2 if xa.size == xb.size else 1
        return _no_spread("permutation", diff, NAN, extreme / math.comb(xa.size + xb.size, xa.size))
    with warnings.catch_warnings():  # one group without spread is fine for Welch; scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        result = sps.ttest_ind(xa, xb, equal_var=False)
    low, high = result.confidence_interval(confidence)
    return TTestResult("Welch", diff, float(low), float(high), float(result.statistic), float(result.df),
                      float(result.pvalue))


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult:
    """Paired t test on the differences a[i] - b[i] (a[i] and b[i] share a seed): their mean, t interval, p.

    Fewer than two pairs: every field NaN except `diff` (NaN for none). Differences without spread: see
    `_no_spread` (test "sign-flip": of the 2^pairs sign assignments only all + and all - are as extreme),
    dof = pairs - 1.
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired_test needs as many a as b values, got {xa.size} and {xb.size}")
    d = xa - xb
    diff = float(d.mean()) if d.size else NAN
    if d.size < 2:
        return TTestResult("paired", diff, NAN, NAN, NAN, NAN, NAN)
    if d.var(ddof=1) == 0:
        return _no_spread("sign-flip", diff, float(d.size - 1), min(1.0, 2.0 / 2.0**d.size))
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


# -- what a comparison can detect, equivalence and seeds needed ---------------------------------------
POWER = 0.8


def t_power(effect: float, se: float, dof: float, alpha: float = 0.05) -> float:
    """Power of a two-sided t test at level `alpha` when the true difference is `effect` and its standard
    error is `se` (the noncentral t with noncentrality effect / se)."""
    if not (se > 0 and dof > 0):
        return NAN
    crit = sps.t.ppf(1 - alpha / 2, dof)
    nc = abs(effect) / se
    upper, lower = sps.nct.sf(crit, dof, nc), sps.nct.cdf(-crit, dof, nc)
    # scipy's noncentral t gives NaN far out in a tail, where the probability is 1 (upper) or 0 (lower)
    return float((1.0 if math.isnan(upper) else upper) + (0.0 if math.isnan(lower) else lower))


def min_detectable(se: float, dof: float, alpha: float = 0.05, power: float = POWER) -> float:
    """The smallest true difference a two-sided t test (standard error `se`, `dof` degrees of freedom)
    detects with probability `power` at level `alpha`: the minimum detectable effect. NaN without spread."""
    if not (se > 0 and dof > 0 and 0 < alpha < 1):
        return NAN
    high = se * (sps.t.ppf(1 - alpha / 2, dof) + sps.t.ppf(power, dof))  # the normal approximation's answer
    while t_power(high, se, dof, alpha) < power:  # small dof need more: widen until the root is bracketed
        high *= 1.5
    return float(optimize.brentq(lambda d: t_power(d, se, dof, alpha) - power, 0.0, high, xtol=se * 1e-9))


def paired_se(diffs: Sequence[float]) -> tuple[float, float]:
    """(standard error of the mean difference, degrees of freedom) of paired differences."""
    arr = np.asarray(diffs, dtype=float)
    if arr.size < 2:
        return NAN, NAN
    return float(arr.std(ddof=1) / math.sqrt(arr.size)), float(arr.size - 1)


def welch_se(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(standard error of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return NAN, NAN
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return 0.0, NAN
    return float(math.sqrt(va + vb)), float((va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)))


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided t tests (TOST) that the true difference lies within ±margin."""

    margin: float
    p_value: float  # the larger of the two one-sided p values
    equivalent: bool


def equivalence_test(diff: float, se: float, dof: float, margin: float, alpha: float = 0.05) -> Equivalence:
    """TOST on a difference `diff` with standard error `se`: equivalent when both H0: d <= -margin and
    H0: d >= +margin are rejected at `alpha`. Without spread (se 0) the difference is exact."""
    if not (margin > 0) or math.isnan(diff) or math.isnan(se):
        return Equivalence(margin, NAN, False)
    if se == 0:
        inside = abs(diff) < margin
        return Equivalence(margin, 0.0 if inside else 1.0, inside)
    p_low = float(sps.t.sf((diff + margin) / se, dof))   # H0: d <= -margin
    p_high = float(sps.t.cdf((diff - margin) / se, dof))  # H0: d >= +margin
    p = max(p_low, p_high)
    return Equivalence(margin, p, p < alpha)


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = POWER, most: int = 10_000) -> int | None:
    """The fewest pairs (seeds) whose paired t test, with differences of standard deviation `sd`, detects a
    true difference `effect` with probability `power`; None when even `most` would not (or nothing is known)."""
    if not (sd > 0 and abs(effect) > 0):
        return None
    enough = lambda n: t_power(effect, sd / math.sqrt(n), n - 1, alpha) >= power  # noqa: E731 (rises with n)
    low, high = 1, 2  # low is too few; double high until it is enough, then bisect
    while not enough(high):
        if high >= most:
            return None
        low, high = high, min(2 * high, most)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high

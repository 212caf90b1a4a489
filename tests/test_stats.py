"""diffusion_lib.stats against values worked out by hand (and cross-checked with scipy)."""
import math

import pytest
from scipy import stats as sps

from diffusion_lib.stats import WelchResult, interpolate_at, mean_ci, verdict, welch_test

# The worked example used throughout:
#   a = [1, 2, 3, 4]:      mean 2.5, sample variance ((1.5² + 0.5² + 0.5² + 1.5²) / 3) = 5/3
#   b = [2, 4, 6, 8, 10]:  mean 6,   sample variance ((16 + 4 + 0 + 4 + 16) / 4)     = 10
A = [1, 2, 3, 4]
B = [2, 4, 6, 8, 10]


def test_mean_ci_by_hand():
    # standard error of a's mean = sqrt(5/3) / sqrt(4) = sqrt(5/12) = 0.645497...
    # t(0.975, dof 3) = 3.1824 (any t table), so the half width = 3.1824 * 0.645497 = 2.0542
    mean, half = mean_ci(A)
    assert mean == 2.5
    assert half == pytest.approx(2.0542, abs=1e-4)


def test_mean_ci_other_confidence_and_small_samples():
    # 90 %: t(0.95, dof 3) = 2.3534 from a t table -> 2.3534 * 0.645497 = 1.5191
    assert mean_ci(A, confidence=0.90)[1] == pytest.approx(1.5191, abs=1e-4)
    mean, half = mean_ci([0.3])
    assert mean == 0.3 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_welch_by_hand():
    # squared standard errors: (5/3)/4 = 5/12 and 10/5 = 2, so se² = 5/12 + 2 = 29/12
    # diff = 2.5 - 6 = -3.5;  t = -3.5 / sqrt(29/12) = -2.25144
    # Welch-Satterthwaite dof = (29/12)² / ((5/12)²/3 + 2²/4) = (841/144) / (457/432) = 2523/457 = 5.52079
    r = welch_test(A, B)
    assert r.diff == pytest.approx(-3.5)
    assert r.t == pytest.approx(-2.25144, abs=1e-5)
    assert r.dof == pytest.approx(2523 / 457)
    # p and the interval need the t distribution at a fractional dof: cross-check with scipy
    reference = sps.ttest_ind(A, B, equal_var=False)
    assert r.p_value == pytest.approx(reference.pvalue)
    assert r.p_value == pytest.approx(0.0691, abs=1e-4)
    low, high = reference.confidence_interval()
    assert (r.ci_low, r.ci_high) == (pytest.approx(low), pytest.approx(high))
    # the interval is symmetric about diff with half width t(0.975, dof) * sqrt(29/12)
    half = sps.t.ppf(0.975, 2523 / 457) * math.sqrt(29 / 12)
    assert r.ci_high - r.diff == pytest.approx(half)
    assert r.ci_low < 0 < r.ci_high  # consistent with p > 0.05


def test_welch_is_antisymmetric():
    ab, ba = welch_test(A, B), welch_test(B, A)
    assert ba.diff == pytest.approx(-ab.diff) and ba.t == pytest.approx(-ab.t)
    assert ba.p_value == pytest.approx(ab.p_value) and ba.ci_low == pytest.approx(-ab.ci_high)


def test_welch_degenerate_inputs():
    too_few = welch_test([1.0], [2.0, 3.0])
    assert too_few.diff == pytest.approx(-1.5)
    assert all(math.isnan(v) for v in (too_few.ci_low, too_few.ci_high, too_few.t, too_few.dof, too_few.p_value))
    assert math.isnan(welch_test([], [1.0, 2.0]).diff)
    # no spread in either group: the difference is exact
    same = welch_test([2.0, 2.0], [2.0, 2.0, 2.0])
    assert (same.diff, same.ci_low, same.ci_high, same.t, same.p_value) == (0.0, 0.0, 0.0, 0.0, 1.0)
    apart = welch_test([1.0, 1.0], [3.0, 3.0])
    assert (apart.diff, apart.ci_low, apart.ci_high, apart.p_value) == (-2.0, -2.0, -2.0, 0.0)
    assert apart.t == -math.inf and math.isnan(apart.dof)
    # spread in one group only: dof comes from that group alone (n - 1)
    one = welch_test([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert one.dof == pytest.approx(2.0)


def _result(diff: float, p: float) -> WelchResult:
    return WelchResult(diff, math.nan, math.nan, math.nan, math.nan, p)


def test_verdict_words():
    assert verdict(_result(-1.0, 0.01)) == "better"
    assert verdict(_result(1.0, 0.01)) == "worse"
    assert verdict(_result(-1.0, 0.2)) == "no detectable difference"
    assert verdict(_result(-1.0, 0.05)) == "no detectable difference"  # p must be strictly below alpha
    assert verdict(_result(-1.0, 0.08), alpha=0.1) == "better"
    assert verdict(_result(-1.0, math.nan)) == "no detectable difference"
    assert verdict(welch_test(A, B)) == "no detectable difference"  # p = 0.069
    assert verdict(welch_test([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])) == "better"


def test_interpolate_at_is_log_linear():
    # halfway between y = 1 and y = 100 in log space is 10 (the geometric mean), not 50.5
    assert interpolate_at([0, 10], [1, 100], 5) == pytest.approx(10.0)
    # a quarter of the way: 10 ** (2 * 0.25) = sqrt(10)
    assert interpolate_at([0, 10], [1, 100], 2.5) == pytest.approx(math.sqrt(10))
    # the bracketing pair is used, and points are sorted by x first
    assert interpolate_at([20, 0, 10], [0.25, 4, 1], 15) == pytest.approx(0.5)
    assert interpolate_at([0, 10, 20], [4, 1, 0.25], 10) == 1.0
    assert interpolate_at([0, 10], [1, 100], 0) == 1.0 and interpolate_at([0, 10], [1, 100], 10) == 100.0


def test_interpolate_at_outside_range_and_edge_cases():
    assert math.isnan(interpolate_at([5, 10], [1, 2], 4.9))
    assert math.isnan(interpolate_at([5, 10], [1, 2], 10.1))
    assert math.isnan(interpolate_at([], [], 1.0))
    assert math.isnan(interpolate_at([5, 10], [1, 2], math.nan))
    assert interpolate_at([3], [7], 3) == 7.0
    # a non-positive y has no log: that segment is read linearly
    assert interpolate_at([0, 10], [0, 4], 5) == pytest.approx(2.0)

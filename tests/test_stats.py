"""diffusion_lib.report.stats against values worked out by hand (and cross-checked with scipy)."""
import math

import pytest
from scipy import stats as sps

from diffusion_lib.report.stats import holm, interpolate_at, mean_ci, paired_test, verdict, welch_test

# The worked example used throughout:
#   a = [1, 2, 3, 4]:      mean 2.5, sample variance ((1.5² + 0.5² + 0.5² + 1.5²) / 3) = 5/3
#   b = [2, 4, 6, 8, 10]:  mean 6,   sample variance ((16 + 4 + 0 + 4 + 16) / 4)     = 10
A = [1, 2, 3, 4]
B = [2, 4, 6, 8, 10]
NAN = math.nan


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
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)  # no spread: the mean is exact


def test_welch_by_hand():
    # squared standard errors: (5/3)/4 = 5/12 and 10/5 = 2, so se² = 5/12 + 2 = 29/12
    # diff = 2.5 - 6 = -3.5;  t = -3.5 / sqrt(29/12) = -2.25144
    # Welch-Satterthwaite dof = (29/12)² / ((5/12)²/3 + 2²/4) = (841/144) / (457/432) = 2523/457 = 5.52079
    r = welch_test(A, B)
    assert r.test == "Welch"
    assert r.diff == pytest.approx(-3.5)
    assert r.t == pytest.approx(-2.25144, abs=1e-5)
    assert r.dof == pytest.approx(2523 / 457)
    # p at a fractional dof: 2 * P(T > 2.25144) for T ~ t(5.52079), from scipy's t distribution
    assert r.p_value == pytest.approx(2 * sps.t.sf(2.25144, 2523 / 457), abs=1e-5)
    assert r.p_value == pytest.approx(0.0691, abs=1e-4)
    # the interval is symmetric about diff with half width t(0.975, dof) * sqrt(29/12)
    half = sps.t.ppf(0.975, 2523 / 457) * math.sqrt(29 / 12)
    assert (r.ci_low, r.ci_high) == (pytest.approx(-3.5 - half), pytest.approx(-3.5 + half))
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
    # no spread in either group: t is undefined, so the exact permutation test gives p and there is no CI
    same = welch_test([2.0, 2.0], [2.0, 2.0, 2.0])
    assert (same.test, same.diff, same.p_value) == ("permutation", 0.0, 1.0)
    assert math.isnan(same.ci_low) and math.isnan(same.ci_high)
    apart = welch_test([1.0, 1.0], [3.0, 3.0])
    # 4 values, C(4, 2) = 6 ways to label two of them 'a': {1, 1} and its swap {3, 3} are the extreme two
    assert (apart.test, apart.diff, apart.p_value) == ("permutation", -2.0, pytest.approx(2 / 6))
    assert math.isnan(apart.ci_low) and math.isnan(apart.dof)
    uneven = welch_test([1.0, 1.0], [3.0, 3.0, 3.0])
    assert uneven.p_value == pytest.approx(1 / 10)  # C(5, 2) = 10 labellings; only the observed one is as extreme
    # spread in one group only: dof comes from that group alone (n - 1)
    one = welch_test([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert one.dof == pytest.approx(2.0)


def test_paired_by_hand():
    # differences a - b = [2, 3, 2, 3]: mean 2.5, sample variance (4 * 0.25) / 3 = 1/3,
    # standard error sqrt(1/3) / sqrt(4) = 0.288675, t = 2.5 / 0.288675 = 5 * sqrt(3) = 8.66025, dof 3.
    # For 3 dof the t CDF has a closed form: two-sided p = 1 - (2/pi) * (x / (1 + x²) + atan(x)), x = t / sqrt(3) = 5
    #   = 1 - 0.63662 * (5/26 + 1.373401) = 1 - 0.63662 * 1.565709 = 1 - 0.996761 = 0.003239
    # 95 % CI: 2.5 ± t(0.975, 3) * 0.288675 = 2.5 ± 3.18245 * 0.288675 = 2.5 ± 0.918695
    r = paired_test([3, 5, 4, 6], [1, 2, 2, 3])
    assert r.test == "paired"
    assert r.diff == pytest.approx(2.5)
    assert r.t == pytest.approx(5 * math.sqrt(3))
    assert r.dof == 3
    assert r.p_value == pytest.approx(1 - 2 / math.pi * (5 / 26 + math.atan(5)))
    assert r.p_value == pytest.approx(0.003239, abs=1e-6)
    assert (r.ci_low, r.ci_high) == (pytest.approx(1.581305, abs=1e-5), pytest.approx(3.418695, abs=1e-5))


def test_pairing_removes_the_seed_spread():
    # per-seed values that differ a lot between seeds but by a steady amount within a seed:
    # differences [0.1, 0.2, 0.1]: mean 0.13333, sd 0.057735, se 0.033333, t = 4, dof 2;
    # for 2 dof the two-sided p is 1 - t / sqrt(t² + 2) = 1 - 4 / sqrt(18) = 0.057191
    a, b = [1.1, 2.2, 3.1], [1.0, 2.0, 3.0]
    paired = paired_test(a, b)
    assert paired.t == pytest.approx(4.0)
    assert paired.p_value == pytest.approx(1 - 4 / math.sqrt(18))
    assert welch_test(a, b).p_value > 0.8  # unpaired, the seed spread (sd ~1) hides the difference


def test_paired_degenerate_inputs():
    one = paired_test([2.0], [1.0])
    assert one.diff == 1.0 and all(math.isnan(v) for v in (one.ci_low, one.ci_high, one.t, one.dof, one.p_value))
    assert math.isnan(paired_test([], []).diff)
    # differences without spread: t is undefined; the exact sign-flip test has 2^3 = 8 sign assignments of
    # which all + and all - are as extreme, p = 2 / 8, and there is no CI
    steady = paired_test([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert (steady.test, steady.diff, steady.p_value, steady.dof) == ("sign-flip", 2.0, pytest.approx(0.25), 2.0)
    assert math.isnan(steady.ci_low) and math.isnan(steady.ci_high)
    # two seeds tied by chance on a discrete score: p = 2 / 4, not the t limit 0
    assert paired_test([0.5, 0.75], [0.25, 0.5]).p_value == pytest.approx(0.5)
    six = paired_test([1.0] * 6, [0.0] * 6)
    assert six.p_value == pytest.approx(2 / 64) and six.p_value < 0.05
    equal = paired_test([1.0, 2.0], [1.0, 2.0])
    assert (equal.diff, equal.p_value) == (0.0, 1.0)
    with pytest.raises(ValueError, match="as many"):
        paired_test([1.0, 2.0], [1.0])


def test_holm_by_hand():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4; sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06,
    # 0.04 * 1 = 0.04 -> raised to 0.06 (never below the adjusted value of a smaller p)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN (a test not run) is passed through and not counted: the same four give the same values
    adjusted = holm([0.01, NAN, 0.04, 0.03, 0.005])
    assert math.isnan(adjusted[1])
    assert [adjusted[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1: 0.6 * 2 = 1.2 -> 1, then 0.9 * 1 = 0.9 -> raised to 1
    assert holm([0.6, 0.9]) == [1.0, 1.0]
    # m = 2: 0.3 * 2 = 0.6, 0.5 * 1 = 0.5 -> 0.6
    assert holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm([0.02]) == [0.02]  # one test: nothing to correct
    assert holm([]) == []
    assert all(math.isnan(v) for v in holm([NAN, NAN]))


def test_verdict_words():
    assert verdict(-1.0, 0.01) == "better"
    assert verdict(1.0, 0.01) == "worse"
    assert verdict(-1.0, 0.2) == "no detectable difference"
    assert verdict(-1.0, 0.05) == "no detectable difference"  # p must be strictly below alpha
    assert verdict(-1.0, 0.08, alpha=0.1) == "better"
    assert verdict(-1.0, NAN) == "no detectable difference"
    # an accuracy: the higher group is the better one
    assert verdict(1.0, 0.01, higher_is_better=True) == "better" and verdict(-1.0, 0.01, higher_is_better=True) == "worse"
    r = welch_test(A, B)  # p = 0.069
    assert verdict(r.diff, r.p_value) == "no detectable difference"


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

"""Power, the minimum detectable effect, equivalence and seeds needed, against simulated studies and
t tests written out here."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from diffusion_lib.report.stats import (
    equivalence_test, min_detectable, paired_se, seeds_needed, t_power, welch_se,
)


def simulated_power(n: int, effect: float, sd: float, trials: int = 4000, seed: int = 0) -> float:
    """The share of `trials` simulated paired studies (n pairs, differences ~ N(effect, sd)) whose two-sided
    paired t test rejects at 0.05, counted directly."""
    diffs = np.random.default_rng(seed).normal(effect, sd, size=(trials, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1)))


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_minimum_detectable_effect_is_detected_four_times_in_five(n):
    sd = 0.7
    mde = min_detectable(sd / math.sqrt(n), n - 1)
    assert simulated_power(n, mde, sd) == pytest.approx(0.8, abs=0.025)  # 4 000 trials: sd of the share 0.006
    assert simulated_power(n, mde / 2, sd) < 0.6  # half of it is detected far less often


def test_power_matches_simulation_at_other_effects():
    for effect in (0.2, 0.5, 1.0):
        assert t_power(effect, 1 / math.sqrt(6), 5) == pytest.approx(simulated_power(6, effect, 1.0, seed=1), abs=0.025)


def test_the_minimum_detectable_effect_at_a_stricter_level_is_larger():
    se, dof = 0.1, 4
    assert min_detectable(se, dof, alpha=0.05 / 3) > min_detectable(se, dof)


def test_equivalence_is_two_one_sided_t_tests_written_out():
    diffs = np.array([0.01, -0.02, 0.015, 0.0, -0.005, 0.012])
    se, dof = paired_se(diffs)
    assert se == pytest.approx(diffs.std(ddof=1) / math.sqrt(6)) and dof == 5
    margin = 0.03
    # H0: mean <= -margin, rejected for large t; H0: mean >= +margin, rejected for small t
    t_low = (diffs.mean() + margin) / se
    t_high = (diffs.mean() - margin) / se
    p = max(1 - sps.t.cdf(t_low, 5), sps.t.cdf(t_high, 5))
    result = equivalence_test(diffs.mean(), se, dof, margin)
    assert result.p_value == pytest.approx(p) and result.equivalent == (p < 0.05)
    assert result.equivalent  # the 90 % interval lies well within +-0.03
    assert not equivalence_test(diffs.mean(), se, dof, 0.005).equivalent


def test_equivalence_agrees_with_the_ninety_percent_interval():
    rng = np.random.default_rng(3)
    for _ in range(50):
        diffs = rng.normal(0.01, 0.02, size=5)
        se, dof = paired_se(diffs)
        half = sps.t.ppf(0.95, dof) * se
        inside = abs(diffs.mean()) + half < 0.03
        assert equivalence_test(diffs.mean(), se, dof, 0.03).equivalent == inside


def test_seeds_needed_is_the_first_n_a_direct_search_finds():
    for sd, effect in ((1.0, 0.5), (0.3, 0.4), (2.0, 0.3)):
        direct = next(n for n in range(2, 5000)
                      if t_power(effect, sd / math.sqrt(n), n - 1) >= 0.8)
        assert seeds_needed(sd, effect) == direct
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1.0, 0.0) is None


def test_seeds_needed_reaches_the_promised_power_in_simulation():
    n = seeds_needed(1.0, 0.8)
    assert simulated_power(n, 0.8, 1.0, seed=2) >= 0.78
    assert simulated_power(n - 1, 0.8, 1.0, seed=2) < 0.8 + 0.02


def test_welch_standard_error_and_degrees_of_freedom():
    a, b = [1.0, 2.0, 4.0], [0.0, 1.0, 1.5, 3.0]
    se, dof = welch_se(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    assert se == pytest.approx(math.sqrt(va + vb))
    assert dof == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))


@pytest.mark.parametrize("margin", ["x", -1, 0, "0%", True, float("nan"), "2", [2]])
def test_a_bad_equivalence_margin_is_refused_in_one_line(margin):
    from diffusion_lib.harness.config import ConfigError
    from diffusion_lib.study.spec import _check_primary

    with pytest.raises(ConfigError, match="margin = .* must be a number > 0 .* or a percentage of B such as '2%'"):
        _check_primary({"compare": ["a", "b"], "metric": "mse_id", "margin": margin}, {"a": {}, "b": {}}, "s.yaml")
    assert _check_primary({"compare": ["a", "b"], "metric": "mse_id", "margin": "2%"}, {"a": {}, "b": {}}, "s")["margin"] == "2%"

"""Yardsticks against closed forms on the addition task (y = a + b, entries uniform in [-c, c])."""
import math

import pytest
import torch

from diffusion_lib.tasks.base import make_task

N = 40_000  # held-out problems: the sampling error of each MSE below is ~1 %


@pytest.fixture(scope="module")
def marks():
    task = make_task({"dataset": "addition", "rank": 2})
    task.fit_samples = 20_000
    sets = task.held_out(N)
    return {ood: unnest(task.yardsticks(sets[name])) for ood, name in ((False, "id"), (True, "ood"))}


def unnest(marks):
    """yardstick -> {"mse": value} -> yardstick -> value (the continuous tasks have one metric)."""
    assert all(list(by_metric) == ["mse"] for by_metric in marks.values())
    return {name: by_metric["mse"] for name, by_metric in marks.items()}


def test_trivial_predictors_score_the_answers_variance(marks):
    # y = a + b with a, b ~ U[-c, c]: mean 0, variance 2 c^2 / 3 -> zeros and the training mean both score it
    for ood, c in ((False, 1.0), (True, 2.5)):
        assert marks[ood]["zeros"] == pytest.approx(2 * c * c / 3, rel=0.03)
        assert marks[ood]["train_mean"] == pytest.approx(2 * c * c / 3, rel=0.03)


def test_the_linear_map_is_exact_for_a_linear_task(marks):
    assert marks[False]["linear"] < 1e-10 and marks[True]["linear"] < 1e-10  # also out of distribution


def test_clamp_floor(marks):
    # in distribution |a + b| <= 2: clamping to +-2 loses nothing. ood (c = 2.5): y has the triangular density
    # (5 - |y|) / 25 on [-5, 5], so E[(|y| - 2)^2; |y| > 2] = 2/25 * int_0^3 u^2 (3 - u) du = 2/25 * 27/4 = 0.54
    assert marks[False]["clamp_floor"] == 0.0
    assert marks[True]["clamp_floor"] == pytest.approx(0.54, rel=0.05)


def test_fit_is_reproducible_and_its_mean_is_the_training_mean():
    task = make_task({"dataset": "inverse", "rank": 3})
    task.fit_samples = 2_000
    mean, weights = task._fit(2_000)
    again, _ = task._fit(2_000)
    assert torch.equal(mean, again) and weights.shape == (9 + 1, 9)
    x, y, _ = task.sample(2_000, torch.Generator().manual_seed(123))
    # two independent samples of 2 000: off-diagonal entries of A^-1 have heavy tails, so allow a few SE
    torch.testing.assert_close(mean, y.double().mean(0), atol=0.06, rtol=0)


def test_the_linear_map_is_skipped_where_its_solve_would_take_minutes():
    task = make_task({"dataset": "addition", "rank": 35})  # 2 * 35^2 = 2 450 inputs, beyond MAX_LINEAR_INPUTS
    task.fit_samples = 100
    marks = unnest(task.yardsticks(task.held_out(64)["id"]))
    assert math.isnan(marks["linear"]) and marks["train_mean"] > 0 and marks["clamp_floor"] == 0.0

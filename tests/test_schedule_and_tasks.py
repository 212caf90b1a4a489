import math

import pytest
import torch

from diffusion_lib.schedule import schedule_constants
from diffusion_lib.tasks.base import make_task


@pytest.mark.parametrize("timesteps", [1, 10, 50])
def test_schedule_constants_match_closed_forms(timesteps):
    s = 0.008
    f = [math.cos(((k / timesteps) + s) / (1 + s) * math.pi / 2) ** 2 for k in range(timesteps + 1)]
    abar_k = [v / f[0] for v in f]
    betas = [min(max(1 - abar_k[t + 1] / abar_k[t], 0.0), 0.999) for t in range(timesteps)]
    c = schedule_constants(timesteps)
    abar = 1.0
    for t in range(timesteps):
        abar *= 1 - betas[t]
        expected = {
            "betas": betas[t],
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": math.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - abar),
            "sqrt_recip_alphas_cumprod": math.sqrt(1 / abar),
            "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / abar - 1),
            "opt_step_size": betas[t] * math.sqrt(1 / (1 - abar)),
        }
        for name, value in expected.items():
            assert c[name][t].item() == pytest.approx(value, rel=1e-6), (name, t)
            assert c[name].dtype == torch.float32


def _batch(name, rank=4, ood=False, batch=32, seed=0):
    task = make_task({"dataset": name, "rank": rank, "ood": ood})
    x, y, mask = task.sample(batch, torch.Generator().manual_seed(seed))
    assert mask is None  # the continuous tasks give no answer entries
    return task, x, y


@pytest.mark.parametrize("ood", [False, True])
def test_inverse_answers_invert_the_condition(ood):
    task, x, y = _batch("inverse", ood=ood)
    a, a_inv = x.view(-1, 4, 4), y.view(-1, 4, 4)
    assert torch.allclose(a @ a_inv, torch.eye(4).expand_as(a), atol=1e-4)
    lam = 0.1 if ood else 0.5
    assert torch.linalg.eigvalsh(a).min() >= lam - 1e-4  # A = 2 U U^T + lambda I
    assert torch.allclose(a, a.transpose(-1, -2))


def test_addition_and_lowrank_data():
    _, x, y = _batch("addition")
    assert torch.allclose(y, x[:, :16] + x[:, 16:])
    assert x.abs().max() <= 1.0
    _, x_ood, _ = _batch("addition", ood=True)
    assert x_ood.abs().max() > 1.0 and x_ood.abs().max() <= 2.5
    _, x, y = _batch("lowrank")
    kept = x != 0
    assert torch.equal(x[kept], y[kept])  # x is R with about half the entries masked out
    assert 0.35 < kept.float().mean() < 0.65


@pytest.mark.parametrize("name", ["inverse", "addition", "lowrank"])  # the discrete tasks: test_reasoning_*.py
def test_batches_are_reproducible_and_held_out_sets_fixed(name):
    _, x1, y1 = _batch(name, seed=3)
    _, x2, y2 = _batch(name, seed=3)
    _, x3, _ = _batch(name, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    task = make_task({"dataset": name, "rank": 4})
    a, b = task.held_out(16)["id"], make_task({"dataset": name, "rank": 4}).held_out(16)["id"]
    assert torch.equal(a.x, b.x) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.x, task.held_out(16)["ood"].x)
    shards = [a.shard(i, 3) for i in range(3)]
    assert torch.equal(torch.cat([s.x for s in shards]), a.x)  # shards cover the set exactly once


def test_unknown_task_and_bad_rank():
    with pytest.raises(ValueError, match="allowed: inverse, addition, lowrank, connectivity, sudoku"):
        make_task({"dataset": "chess"})
    with pytest.raises(ValueError, match="rank"):
        make_task({"dataset": "inverse", "rank": 0})

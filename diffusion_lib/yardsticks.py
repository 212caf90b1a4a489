"""Yardsticks for a held-out MSE: what trivial predictors score on the same problems, and the floor.

- zeros: predict y = 0;
- train_mean: predict the per-entry mean answer of the training distribution;
- linear: the least-squares affine map from the condition x to y, fit on fresh training problems;
- clamp_floor: the true answer clamped to the data bound (+-2) -- the best any model can do, since
  every sampled answer is clamped there.
The fit uses `fit_samples` problems from a fixed seed of its own (not the held-out sets' seeds).
"""
from __future__ import annotations

import math
import zlib
from functools import lru_cache

import torch

from .tasks import HeldOutSet, MatrixTask, make_task
from .seeds import mix_seed

FIT_SAMPLES = 50_000
MAX_LINEAR_INPUTS = 2_400  # the linear map's solve grows as inputs^3: ~10 s here at 2 400
_CHUNK = 5_000


def mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return (prediction.double() - target.double()).pow(2).mean().item()


def fit_baselines(task: MatrixTask, fit_samples: int = FIT_SAMPLES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-entry training mean of y [D], least-squares affine map [inp_dim + 1, D] or None) in float64.

    Accumulates the normal equations chunk by chunk; vec(A) of a symmetric A repeats columns, so the
    system is rank-deficient and is solved for the minimum-norm solution (SVD-based lstsq). Above
    MAX_LINEAR_INPUTS inputs (rank > 49 on inversion) that solve takes minutes to hours and gigabytes,
    so the linear map is not fit (None).
    """
    generator = torch.Generator().manual_seed(mix_seed(zlib.crc32(task.name.encode()), task.rank, int(task.ood), 2))
    linear = task.inp_dim <= MAX_LINEAR_INPUTS
    gram = torch.zeros(task.inp_dim + 1, task.inp_dim + 1, dtype=torch.float64) if linear else None
    cross = torch.zeros(task.inp_dim + 1, task.out_dim, dtype=torch.float64) if linear else None
    total = torch.zeros(task.out_dim, dtype=torch.float64)
    for start in range(0, fit_samples, _CHUNK):
        x, y = task.sample(min(_CHUNK, fit_samples - start), generator)
        total += y.double().sum(dim=0)
        if linear:
            design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            gram += design.T @ design
            cross += design.T @ y.double()
    weights = torch.linalg.lstsq(gram, cross, driver="gelsd").solution if linear else None
    return total / fit_samples, weights


@lru_cache(maxsize=16)
def _baselines(name: str, rank: int, ood: bool, fit_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return fit_baselines(make_task(name, rank, ood), fit_samples)


def yardsticks(task: MatrixTask, held_out: HeldOutSet, data_bound: float = 2.0,
               fit_samples: int = FIT_SAMPLES) -> dict[str, float]:
    """The four yardstick MSEs on one held-out set (baselines fit on `task`'s training distribution)."""
    mean, weights = _baselines(task.name, task.rank, task.ood, fit_samples)
    x, y = held_out.x.cpu().double(), held_out.y.cpu().double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1) if weights is not None else None
    return {
        "zeros": mse(torch.zeros_like(y), y),
        "train_mean": mse(mean.expand_as(y), y),
        "linear": mse(design @ weights, y) if weights is not None else math.nan,  # NaN: too large to fit
        "clamp_floor": mse(y.clamp(-data_bound, data_bound), y),
    }

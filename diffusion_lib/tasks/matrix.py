"""The continuous matrix tasks (inversion, addition, low-rank completion) and their yardsticks."""
from __future__ import annotations

import math
import zlib

import torch
from einops import rearrange
from torch import Tensor

from diffusion_lib.registry import Option
from diffusion_lib.tasks.base import Batch, HeldOutSet, Metric, Task, mix_seed, register_task

MSE = Metric("mse", False, "MSE")
FIT_SAMPLES = 50_000  # problems the train_mean and linear yardsticks are fit on
MAX_LINEAR_INPUTS = 2_400  # the linear map's solve grows as inputs^3: ~10 s here at 2 400
_FIT_CHUNK = 5_000
_BASELINES: dict[tuple, tuple[Tensor, Tensor | None]] = {}  # fits by (task config, fit_samples)


class MatrixTask(Task):
    """A rank-n matrix task with an out-of-distribution ("ood") variant; subclasses define `generate`."""

    options = {
        "rank": Option(int, 20, lambda v: 1 <= v <= 100, "an int in [1, 100]"),  # n^2 = 10,000 numbers at 100
        "ood": Option(bool, False, lambda v: True, "true or false"),  # train on the harder set's distribution
    }
    metrics = (MSE,)
    rank: int
    ood: bool
    fit_samples: int = FIT_SAMPLES

    @property
    def inp_dim(self) -> int:
        return self.rank * self.rank

    @property
    def out_dim(self) -> int:
        return self.rank * self.rank

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        return Batch(*self.generate(batch, generator, self.ood))

    def held_out(self, num_samples: int) -> dict[str, HeldOutSet]:
        return {name: self._held_out_set(ood, num_samples) for name, ood in (("id", False), ("ood", True))}

    def _held_out_set(self, ood: bool, num_samples: int) -> HeldOutSet:
        generator = torch.Generator().manual_seed(mix_seed(zlib.crc32(self.name.encode()), self.rank, int(ood)))
        x, y = self.generate(num_samples, generator, ood)
        return HeldOutSet(x, y, torch.randn(y.shape, generator=generator))

    def score(self, answer: Tensor, data: HeldOutSet) -> dict[str, Tensor]:
        wide = torch.float32 if answer.device.type == "mps" else torch.float64  # MPS has no float64
        return {"mse": (answer.to(wide) - data.y.to(wide)).pow(2).mean(dim=-1)}

    def yardsticks(self, data: HeldOutSet) -> dict[str, dict[str, float]]:
        """zeros; train_mean (the training distribution's per-entry mean answer); linear (the least-squares
        affine map from x to y, fit on fresh training problems; NaN above MAX_LINEAR_INPUTS inputs);
        clamp_floor (the true answer clamped to the answer bound: the best any clamped sample can do)."""
        mean, weights = self.fit_baselines()
        x, y = data.x.cpu().double(), data.y.cpu().double()
        linear = math.nan
        if weights is not None:
            linear = _mse(torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1) @ weights, y)
        marks = {
            "zeros": _mse(torch.zeros_like(y), y),
            "train_mean": _mse(mean.expand_as(y), y),
            "linear": linear,
            "clamp_floor": _mse(y.clamp(-self.answer_bound, self.answer_bound), y),
        }
        return {name: {"mse": value} for name, value in marks.items()}

    def fit_baselines(self) -> tuple[Tensor, Tensor | None]:
        """(per-entry training mean of y [D], least-squares affine map [inp_dim + 1, D] or None), float64,
        fit once per task config from a seed of their own (not the held-out sets')."""
        key = (tuple(sorted(self.config.items())), self.fit_samples)
        if key not in _BASELINES:
            _BASELINES[key] = self._fit(self.fit_samples)
        return _BASELINES[key]

    def _fit(self, fit_samples: int) -> tuple[Tensor, Tensor | None]:
        # Normal equations chunk by chunk; vec(A) of a symmetric A repeats columns, so the system is
        # rank-deficient: minimum-norm solution (SVD-based lstsq). Above MAX_LINEAR_INPUTS inputs the solve
        # takes minutes to hours and gigabytes, so the linear map is not fit.
        generator = torch.Generator().manual_seed(mix_seed(zlib.crc32(self.name.encode()), self.rank, int(self.ood), 2))
        linear = self.inp_dim <= MAX_LINEAR_INPUTS
        gram = torch.zeros(self.inp_dim + 1, self.inp_dim + 1, dtype=torch.float64)
        cross = torch.zeros(self.inp_dim + 1, self.out_dim, dtype=torch.float64)
        total = torch.zeros(self.out_dim, dtype=torch.float64)
        for start in range(0, fit_samples, _FIT_CHUNK):
            x, y, _ = self.sample(min(_FIT_CHUNK, fit_samples - start), generator)
            total += y.double().sum(dim=0)
            if linear:
                design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
                gram += design.T @ design
                cross += design.T @ y.double()
        weights = torch.linalg.lstsq(gram, cross, driver="gelsd").solution if linear else None
        return total / fit_samples, weights

    # helpers for subclasses: every draw goes through the caller's generator, on its device
    @staticmethod
    def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low

    @staticmethod
    def _normal(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)


def _mse(prediction: Tensor, target: Tensor) -> float:
    return (prediction.double() - target.double()).pow(2).mean().item()


def _positive_float(default: float) -> Option:
    return Option(float, default, lambda v: v > 0, "a float > 0")


@register_task
class InverseTask(MatrixTask):
    """x = vec(A), y = vec(A^-1), A = 2 U U^T + lambda I: lambda = conditioning (0.5) in distribution,
    ood_conditioning (0.1, worse conditioned) on the harder set."""

    name = "inverse"
    title = "matrix inversion"
    options = {**MatrixTask.options, "conditioning": _positive_float(0.5), "ood_conditioning": _positive_float(0.1)}
    conditioning: float
    ood_conditioning: float

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        n = self.rank
        u = self._uniform((batch_size, n, n), -1.0, 1.0, generator)
        eye = torch.eye(n, device=u.device)
        a = 2 * u @ u.transpose(-1, -2) + (self.ood_conditioning if ood else self.conditioning) * eye
        # A is symmetric positive definite: A^-1 = L^-T L^-1 with A = L L^T, in float64 where the device has
        # it (the ood matrices are poorly conditioned). Batched triangular solves rather than
        # cholesky_inverse, which may loop over the batch on a GPU; cholesky_ex: no host sync to check
        # for a failure that A >= lambda I rules out.
        wide = torch.float32 if a.device.type == "mps" else torch.float64
        factor = torch.linalg.cholesky_ex(a.to(wide)).L
        factor_inv = torch.linalg.solve_triangular(factor, torch.eye(n, dtype=wide, device=a.device).expand_as(factor), upper=False)
        a_inv = (factor_inv.transpose(-1, -2) @ factor_inv).float()
        return rearrange(a, "b i j -> b (i j)"), rearrange(a_inv, "b i j -> b (i j)")


@register_task
class AdditionTask(MatrixTask):
    """x = [vec(a), vec(b)], y = vec(a + b), entries uniform in [-c, c], c = 1 (ood: 2.5)."""

    name = "addition"
    title = "matrix addition"

    @property
    def inp_dim(self) -> int:
        return 2 * self.rank * self.rank

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        c = 2.5 if ood else 1.0
        shape = (batch_size, self.rank * self.rank)
        a, b = self._uniform(shape, -c, c, generator), self._uniform(shape, -c, c, generator)
        return torch.cat([a, b], dim=-1), a + b


@register_task
class LowRankTask(MatrixTask):
    """Matrix completion: R = 0.1 N + U V^T / 20 (ood: / 5), half the entries masked; y = vec(R)."""

    name = "lowrank"
    title = "low-rank matrix completion"
    factor_rank = 10

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        n, k = self.rank, self.factor_rank
        u = self._normal((batch_size, n, k), generator)
        v = self._normal((batch_size, n, k), generator)
        r = 0.1 * self._normal((batch_size, n, n), generator) + u @ v.transpose(-1, -2) / (5 if ood else 20)
        mask = (self._uniform((batch_size, n, n), 0.0, 1.0, generator) < 0.5).float()
        return rearrange(r * mask, "b i j -> b (i j)"), rearrange(r, "b i j -> b (i j)")


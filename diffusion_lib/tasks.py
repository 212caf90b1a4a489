"""Continuous reasoning tasks: whole batches generated with torch on the training device.

Every task has a rank n and an out-of-distribution ("ood") variant. Training batches are drawn from
a generator the trainer seeds per step; each held-out set comes from its own fixed seed, so every
strategy and seed is scored on the very same problems (and the same starting noise).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .seeds import mix_seed


@dataclass
class HeldOutSet:
    x: Tensor
    y: Tensor
    noise: Tensor  # the sampler's starting point for each problem, fixed with the problems

    def to(self, device: torch.device | str) -> "HeldOutSet":
        return HeldOutSet(self.x.to(device), self.y.to(device), self.noise.to(device))

    def shard(self, index: int, count: int) -> "HeldOutSet":
        """The index-th of `count` contiguous, disjoint slices that together cover the set once."""
        parts = [torch.tensor_split(v, count)[index] for v in (self.x, self.y, self.noise)]
        return HeldOutSet(*parts)


class MatrixTask:
    """Base class: subclasses set `name` and implement `generate` and the dimensions."""

    name: str = ""

    def __init__(self, rank: int = 20, ood: bool = False):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank = {rank!r} is invalid: must be an int >= 1")
        self.rank, self.ood = rank, ood

    @property
    def inp_dim(self) -> int:
        return self.rank * self.rank

    @property
    def out_dim(self) -> int:
        return self.rank * self.rank

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A training batch (x, y) from this task's training distribution, on the generator's device."""
        return self.generate(batch_size, generator, self.ood)

    def held_out(self, ood: bool, num_samples: int) -> HeldOutSet:
        """The fixed validation set for (task, rank, ood): made on the CPU so every device sees it alike."""
        seed = mix_seed(zlib.crc32(self.name.encode()), self.rank, int(ood))
        generator = torch.Generator().manual_seed(seed)
        x, y = self.generate(num_samples, generator, ood)
        noise = torch.randn(y.shape, generator=generator)
        return HeldOutSet(x, y, noise)

    # helpers for subclasses: every draw goes through the caller's generator, on its device
    @staticmethod
    def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low

    @staticmethod
    def _normal(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)


class InverseTask(MatrixTask):
    """x = vec(A), y = vec(A^-1), A = 2 U U^T + lambda I, lambda = 0.5 (ood: 0.1, worse conditioned)."""

    name = "inverse"

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        n = self.rank
        u = self._uniform((batch_size, n, n), -1.0, 1.0, generator)
        eye = torch.eye(n, device=u.device)
        a = 2 * u @ u.transpose(-1, -2) + (0.1 if ood else 0.5) * eye
        # A is symmetric positive definite: A^-1 = L^-T L^-1 with A = L L^T, in float64 where the device has
        # it (the ood matrices are poorly conditioned). Batched triangular solves rather than
        # cholesky_inverse, which may loop over the batch on a GPU; cholesky_ex: no host sync to check
        # for a failure that A >= lambda I rules out.
        wide = torch.float32 if a.device.type == "mps" else torch.float64
        factor = torch.linalg.cholesky_ex(a.to(wide)).L
        factor_inv = torch.linalg.solve_triangular(factor, torch.eye(n, dtype=wide, device=a.device).expand_as(factor), upper=False)
        a_inv = (factor_inv.transpose(-1, -2) @ factor_inv).float()
        return rearrange(a, "b i j -> b (i j)"), rearrange(a_inv, "b i j -> b (i j)")


class AdditionTask(MatrixTask):
    """x = [vec(a), vec(b)], y = vec(a + b), entries uniform in [-c, c], c = 1 (ood: 2.5)."""

    name = "addition"

    @property
    def inp_dim(self) -> int:
        return 2 * self.rank * self.rank

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        c = 2.5 if ood else 1.0
        shape = (batch_size, self.rank * self.rank)
        a, b = self._uniform(shape, -c, c, generator), self._uniform(shape, -c, c, generator)
        return torch.cat([a, b], dim=-1), a + b


class LowRankTask(MatrixTask):
    """Matrix completion: R = 0.1 N + U V^T / 20 (ood: / 5), half the entries masked; y = vec(R)."""

    name = "lowrank"
    factor_rank = 10

    def generate(self, batch_size: int, generator: torch.Generator, ood: bool) -> tuple[Tensor, Tensor]:
        n, k = self.rank, self.factor_rank
        u = self._normal((batch_size, n, k), generator)
        v = self._normal((batch_size, n, k), generator)
        r = 0.1 * self._normal((batch_size, n, n), generator) + u @ v.transpose(-1, -2) / (5 if ood else 20)
        mask = (self._uniform((batch_size, n, n), 0.0, 1.0, generator) < 0.5).float()
        return rearrange(r * mask, "b i j -> b (i j)"), rearrange(r, "b i j -> b (i j)")


TASKS: dict[str, type[MatrixTask]] = {task.name: task for task in (InverseTask, AdditionTask, LowRankTask)}


def make_task(name: str, rank: int = 20, ood: bool = False) -> MatrixTask:
    if name not in TASKS:
        raise ValueError(f"dataset = {name!r} is unknown; allowed: {', '.join(TASKS)}")
    return TASKS[name](rank=rank, ood=ood)

"""Tasks as plug-ins: a task owns its seeded on-device data, its fixed held-out sets, its answer bound, an
optional mask of given answer entries, its metrics (each with a direction) and its yardsticks.

Adding a task is one class and a `@register_task` line; config (`task.dataset` and the task's own keys),
trainer, analysis and report read everything else from it. Training batches are drawn from a generator
the trainer seeds per step; each held-out set comes from its own fixed seed, so every strategy and seed
is scored on the very same problems (and the same starting noise).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from diffusion_lib.registry import Option, resolve_options
from diffusion_lib.tasks.seeds import mix_seed
from diffusion_lib.text import suggest


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    label: str  # how tables and plots name it


@dataclass
class HeldOutSet:
    x: Tensor
    y: Tensor
    noise: Tensor  # the sampler's starting point for each problem, fixed with the problems
    mask: Tensor | None = None  # bool [N, D]: True = a given answer entry (held fixed while sampling)

    def _parts(self) -> list[Tensor | None]:
        return [self.x, self.y, self.noise, self.mask]

    def to(self, device: torch.device | str) -> HeldOutSet:
        return type(self)(*(None if v is None else v.to(device) for v in self._parts()))

    def shard(self, index: int, count: int) -> HeldOutSet:
        """The index-th of `count` contiguous, disjoint slices that together cover the set once."""
        return type(self)(*(None if v is None else torch.tensor_split(v, count)[index] for v in self._parts()))

    def select(self, part: slice) -> HeldOutSet:
        return type(self)(*(None if v is None else v[part] for v in self._parts()))


class Batch(NamedTuple):
    x: Tensor
    y: Tensor
    mask: Tensor | None = None  # bool [B, D], True = given entry; None: nothing is given


class Task:
    """Base class of every task. A subclass sets the class attributes and defines `sample` and `held_out`
    (and `score`/`yardsticks` if its metrics are not the continuous tasks' MSE)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # what a report calls the task ("matrix inversion"); the name if empty
    options: ClassVar[dict[str, Option]] = {}
    metrics: ClassVar[tuple[Metric, ...]] = ()  # the first is the headline metric
    answer_bound: ClassVar[float] = 2.0  # answers and clamps live in +-answer_bound (* sqrt(abar_t))
    defaults: ClassVar[dict[str, Any]] = {}  # config defaults this task needs, under the user's values
    corrupt: ClassVar[Any] = None  # discrete tasks: (y, mask, fraction, uniform, kind=) -> 'random' negatives

    def __init__(self, **options: Any):
        self.config = {"dataset": self.name, **options}
        for key, value in options.items():
            setattr(self, key, value)

    inp_dim: int
    out_dim: int

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        """A training batch on the generator's device."""
        raise NotImplementedError

    def held_out(self, num_samples: int) -> dict[str, HeldOutSet]:
        """The fixed held-out sets by name (e.g. "id", "ood"), made on the CPU so every device sees them alike."""
        raise NotImplementedError

    def score(self, answer: Tensor, data: HeldOutSet) -> dict[str, Tensor]:
        """Metric name -> per-problem values [..., B] (their mean over problems is the metric)."""
        raise NotImplementedError

    def yardsticks(self, data: HeldOutSet) -> dict[str, dict[str, float]]:
        """Yardstick name -> metric -> value on one held-out set (what trivial predictors score); none by default."""
        return {}


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task `task.dataset: <cls.name>`."""
    TASKS[cls.name] = cls
    return cls


def _task_class(task_cfg: Mapping[str, Any]) -> type[Task]:
    name = task_cfg.get("dataset", "inverse")
    if name not in TASKS:
        raise ValueError(f"task['dataset'] = {name!r} is unknown{suggest(str(name), list(TASKS))}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def resolve_task_config(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """{'dataset': name, **the task's options validated and filled in}; ValueError in one line."""
    cls = _task_class(task_cfg)
    given = {k: v for k, v in task_cfg.items() if k != "dataset"}
    return {"dataset": cls.name, **resolve_options("task", given, cls.options, f" for dataset '{cls.name}'")}


def task_defaults(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted config defaults of the task `task_cfg` names."""
    return dict(_task_class(task_cfg).defaults)


def task_title(task_cfg: Mapping[str, Any]) -> str:
    cls = _task_class(task_cfg)
    return cls.title or cls.name


def make_task(task_cfg: Mapping[str, Any]) -> Task:
    resolved = resolve_task_config(task_cfg)
    return TASKS[resolved.pop("dataset")](**resolved)


# -- the continuous matrix tasks ---------------------------------------------------------------------------
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


# the discrete tasks (and their energy models) register themselves in their own modules

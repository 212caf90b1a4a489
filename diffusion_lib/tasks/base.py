"""Tasks as plug-ins: a task owns its seeded on-device data, its fixed held-out sets, its answer bound, an
optional mask of given answer entries, its metrics (each with a direction) and its yardsticks.

Adding a task is one class and a `@register_task` line; config (`task.dataset` and the task's own keys),
trainer, analysis and report read everything else from it. Training batches are drawn from a generator
the trainer seeds per step; each held-out set comes from its own fixed seed, so every strategy and seed
is scored on the very same problems (and the same starting noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from torch import Tensor

from diffusion_lib.registry import Option, Registry


def mix_seed(*parts: int) -> int:
    """Deterministically combine integers (seed, step, process, ...) into one 63-bit seed."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
        value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return value >> 1


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
    probe_options: ClassVar[dict[str, Any]] = {}  # options under which a dry run's probe step costs the same, faster

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

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> str:
        """What is wrong with this combination of valid options ('' when nothing is): for options that depend on
        each other (the config refuses it in one line)."""
        return ""

    def preparation_seconds(self, num_samples: int) -> float:
        """Seconds this machine would spend making data that is not cached yet before the first step; 0 by default."""
        return 0.0


# `TASKS.resolve(task_cfg)`: {'dataset': name, **the task's options validated and filled in}
TASKS: Registry[type[Task]] = Registry("task", "dataset", "inverse", "dataset")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task `task.dataset: <cls.name>`."""
    return TASKS.register(cls.name, cls)


def task_defaults(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted config defaults of the task `task_cfg` names."""
    return dict(TASKS[TASKS.name_of(task_cfg)].defaults)


def task_title(task_cfg: Mapping[str, Any]) -> str:
    cls = TASKS[TASKS.name_of(task_cfg)]
    return cls.title or cls.name


def make_task(task_cfg: Mapping[str, Any]) -> Task:
    resolved = TASKS.resolve(task_cfg)
    return TASKS[resolved.pop("dataset")](**resolved)

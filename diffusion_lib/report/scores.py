"""What a study's runs measured: its scores (metric x held-out set x EMA/raw), estimates over seeds, the runs'
groups, and their curves (for the plots). Every module of the report builds on these."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RUN_STATUSES, RunRecord, is_number
from diffusion_lib.report.stats import interpolate_at, mean_ci

ALPHA = 0.05
BASES = {"ema": "EMA", "raw": "raw"}
LAST_FRACTION = 0.2  # "the end of training" for convergence, EMA lag and mining diagnostics: its last fifth


# -- what the runs measured ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """A task's metric as its runs declare it in final.json."""

    name: str
    higher_is_better: bool
    label: str


@dataclass(frozen=True)
class Score:
    """One final number: a metric on a held-out set, of the EMA or the raw model."""

    metric: str
    set: str
    basis: str  # "ema" | "raw"

    @property
    def name(self) -> str:
        """<metric>_<set>: the EMA key, and what study.yaml's `primary` and the inference sweep name."""
        return f"{self.metric}_{self.set}"

    @property
    def key(self) -> str:
        """final.json key, e.g. mse_id or board_accuracy_harder_raw."""
        return self.name + ("_raw" if self.basis == "raw" else "")

    @property
    def val_key(self) -> str:
        """metrics.jsonl val-line key of the same score."""
        return f"val_{self.key}"

    def on(self, basis: str) -> Score:
        return Score(self.metric, self.set, basis)


@dataclass(frozen=True)
class Scoring:
    """The metrics (task order, first = headline) and held-out sets of a study's finished runs."""

    metrics: dict[str, MetricSpec]
    sets: tuple[str, ...]

    @property
    def headline(self) -> Score | None:
        """The first metric on the first set, EMA model (None when no finished run declared any)."""
        return Score(next(iter(self.metrics)), self.sets[0], "ema") if self.metrics and self.sets else None

    def scores(self, metrics: Sequence[str] | None = None) -> list[Score]:
        """Every (metric, set, basis), metric-major in task order."""
        return [Score(m, s, b) for m in (metrics or self.metrics) for s in self.sets for b in BASES]

    @property
    def names(self) -> list[str]:
        """Every <metric>_<set>, as study.yaml's `primary` may name them."""
        return [s.name for s in self.scores() if s.basis == "ema"]

    def find(self, name: str) -> Score | None:
        """The EMA score called <metric>_<set>, or None."""
        return next((s for s in self.scores() if s.basis == "ema" and s.name == name), None)

    def higher(self, metric: str) -> bool:
        return self.metrics[metric].higher_is_better

    def better(self, metric: str, a: float, b: float) -> bool:
        """a is better than b on `metric`."""
        return a > b if self.higher(metric) else a < b


def scoring(runs: Sequence[RunRecord]) -> Scoring:
    """What the finished runs declare, in first-seen order (a study may sweep the task: the union)."""
    metrics: dict[str, MetricSpec] = {}
    sets: dict[str, None] = {}
    for run in finished(runs):
        labels = run.final.get("metric_labels", {})
        for name, direction in run.final["metrics"].items():
            metrics.setdefault(name, MetricSpec(name, direction == "higher", labels.get(name, name)))
        sets.update(dict.fromkeys(run.final["sets"]))
    return Scoring(metrics, tuple(sets))


@dataclass(frozen=True)
class Estimate:
    """Mean and 95 % Student-t CI half width over n values (half NaN below two values)."""

    mean: float
    half: float
    n: int


def estimate(values: Sequence[float]) -> Estimate:
    finite = [v for v in values if math.isfinite(v)]
    return Estimate(*mean_ci(finite), len(finite))


def group_runs(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by group label, groups in the order they first appear."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def finished(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.finished]


def tally(runs: Sequence[RunRecord]) -> dict[str, int]:
    """How many runs have each status ("in progress" only where some run is)."""
    counts = {status: sum(r.status == status for r in runs) for status in RUN_STATUSES}
    live = sum(r.status == "in progress" for r in runs)
    return {**counts, "in progress": live} if live else counts


def mean_of(values: list[float]) -> float:
    """The mean of the finite values (NaN: none)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def sd(values: list[float]) -> float:
    """The sample standard deviation of the finite values (NaN: fewer than two)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def final_values(runs: Sequence[RunRecord], key: str) -> list[float]:
    """Finite `final[key]` of each finished run that has it."""
    return [v for r in finished(runs) if math.isfinite(v := r.final_number(key))]


# -- curves (for the plots) -----------------------------------------------------------------------------
Curve = tuple[np.ndarray, np.ndarray]  # (x, y), sorted by x


def run_curves(runs: Sequence[RunRecord], kind: str, x_key: str, y_key: str) -> list[Curve]:
    """The (x, y) curve of each finished run that logged both keys."""
    return [c for r in finished(runs) if (c := r.curve(kind, x_key, y_key))[0].size]


def seed_band(seeds: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over curves at the x values all of them share (seeds log the same steps);
    empty arrays when they share none."""
    common = sorted(set.intersection(*(set(xs.tolist()) for xs, _ in seeds))) if seeds else []
    if not common:
        return np.array([]), np.array([]), np.array([]), np.array([])
    stack = np.array([[dict(zip(xs.tolist(), ys.tolist()))[x] for x in common] for xs, ys in seeds])
    return np.array(common), stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)


def mean_on_shared_range(seeds: Sequence[Curve], points: int = 60) -> Curve:
    """The mean of curves logged at different x (seconds, FLOPs), read log-linearly at `points` x values
    on the range every curve covers; empty when their ranges do not overlap."""
    start, end = max(xs[0] for xs, _ in seeds), min(xs[-1] for xs, _ in seeds)
    if start > end:
        return np.array([]), np.array([])
    grid = np.linspace(start, end, points)
    return grid, np.array([np.mean([interpolate_at(xs, ys, x) for xs, ys in seeds]) for x in grid])


def accept_rate_step_curves(run: RunRecord) -> list[Curve]:
    """One (step, accept rate) curve per inner mining step, from the train lines' accept_rate_steps."""
    lines = [r for r in run.metrics if r.get("kind") == "train" and isinstance(r.get("accept_rate_steps"), list)
             and is_number(r.get("step"))]  # fmt: skip
    found = []
    for i in range(max((len(r["accept_rate_steps"]) for r in lines), default=0)):
        points = sorted((float(r["step"]), float(r["accept_rate_steps"][i])) for r in lines
                        if len(r["accept_rate_steps"]) > i and is_number(r["accept_rate_steps"][i]))  # fmt: skip
        found.append((np.array([p[0] for p in points]), np.array([p[1] for p in points])))
    return found

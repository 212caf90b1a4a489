"""What trivial predictors (final.json "yardsticks") score, and how a group's score stands against them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from diffusion_lib.harness.run_dir import RunRecord, is_number
from diffusion_lib.report.scores import Estimate, Scoring, finished, mean_of

BEATS, LEVEL, BEHIND = "beats", "level with", "behind"


def standing(e: Estimate, level: float, higher: bool) -> str | None:
    """A group's score against a yardstick: level with it when the yardstick lies inside the group's 95 %
    CI, otherwise beats or behind by the metric's direction; None when either is missing."""
    if not (math.isfinite(e.mean) and math.isfinite(level)):
        return None
    if math.isfinite(e.half) and abs(e.mean - level) <= e.half:
        return LEVEL
    return BEATS if (e.mean > level if higher else e.mean < level) else BEHIND


def yardstick(run: RunRecord, set_name: str, name: str, metric: str) -> float:
    """A finished run's yardstick score (final.json yardsticks[set][name][metric]); NaN when absent."""
    entry: Any = (run.final or {}).get("yardsticks")
    for part in (set_name, name, metric):
        entry = entry.get(part) if isinstance(entry, dict) else None
    return float(entry) if is_number(entry) else math.nan


def yardstick_names(runs: Sequence[RunRecord]) -> list[str]:
    """Every yardstick any finished run recorded, in first-seen order."""
    names: dict[str, None] = {}
    for run in finished(runs):
        table = run.final.get("yardsticks")
        for entry in table.values() if isinstance(table, dict) else ():
            names.update(dict.fromkeys(entry if isinstance(entry, dict) else ()))
    return list(names)


@dataclass(frozen=True)
class YardstickRow:
    name: str
    metric: str
    mean: float  # over finished runs that have it
    low: float
    high: float
    n: int

    @property
    def varies(self) -> bool:
        """More than 1 % apart across runs (e.g. a sweep over the task): one number would mislead."""
        return self.n > 1 and abs(self.high - self.low) > 0.01 * max(abs(self.low), abs(self.high))


def yardstick_table(runs: Sequence[RunRecord], scores: Scoring) -> dict[str, list[YardstickRow]]:
    """Per held-out set, each yardstick's mean, min and max over the finished runs, per metric."""
    table = {}
    for set_name in scores.sets:
        rows = []
        for name in yardstick_names(runs):
            for metric in scores.metrics:
                values = [v for r in finished(runs) if math.isfinite(v := yardstick(r, set_name, name, metric))]
                low, high = (min(values), max(values)) if values else (math.nan, math.nan)
                rows.append(YardstickRow(name, metric, mean_of(values), low, high, len(values)))
        table[set_name] = rows
    return table


def yardstick_points(runs: Sequence[RunRecord], scores: Scoring) -> dict[str, dict[str, list[YardstickRow]]]:
    """The yardstick table per value of the swept task keys, e.g. 'task.conditioning=0.2': a task sweep changes
    the held-out problems, so one table over every run would average different problems. Empty without one."""
    points: dict[str, list[RunRecord]] = {}
    for run in finished(runs):
        point = " · ".join(f"{key}={value}" for key, value in run.sweep.items() if key.startswith("task."))
        if point:
            points.setdefault(point, []).append(run)
    return {point: yardstick_table(members, scores) for point, members in points.items()}

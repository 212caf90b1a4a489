"""Comparisons at a matched budget (FLOPs, wall-clock seconds) read off the val curves, and the machine load and
packing that decide whether wall-clock comparisons give verdicts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RunRecord, is_number
from diffusion_lib.report.comparisons import MIXED_PACKING, NOT_REACHED, UNEVEN_LOAD, Comparison, compare, group_pairs
from diffusion_lib.report.scores import Estimate, Score, Scoring, estimate, final_values, finished, mean_of
from diffusion_lib.report.stats import interpolate_at

# budget read-off axes: val-line key -> final.json key of the same quantity
BUDGET_AXES = {"flops": "train_flops", "train_seconds": "train_seconds"}
LOAD_SPREAD_LIMIT = 0.5


@dataclass
class BudgetRow:
    group: str
    finished: int
    reached: int  # finished runs whose val curve covers the budget
    own_final: Estimate  # the group's own final value on the axis
    values: dict[str, Estimate]  # by Score.key, over the runs that reached the budget


@dataclass
class BudgetTable:
    """Validation scores read off each run's val curve at one budget on `axis` (flops | train_seconds)."""

    axis: str
    budget: float  # the smallest last val point of any finished run (NaN: no run logged the axis)
    rows: list[BudgetRow]
    comparisons: list[Comparison]
    refused: str | None = None  # why no comparison on this axis gives a verdict (UNEVEN_LOAD, MIXED_PACKING)


def read_at(run: RunRecord, axis: str, score: Score, budget: float) -> float:
    """The run's validation `score` read off its val curve at `axis` = budget; NaN if not reached."""
    xs, ys = run.curve("val", axis, score.val_key)
    return interpolate_at(xs, ys, budget)


def budget_table(
    groups: Mapping[str, Sequence[RunRecord]], scores: Scoring, axis: str, primary: tuple[str, str] | None,
    refuse_all: str | None,
) -> BudgetTable:
    """Read-offs at the largest budget every finished run's val curve (headline score) can reach; a
    comparison gives no verdict unless every finished run of both groups reached it (NOT_REACHED), nor
    when `refuse_all`."""
    head = scores.headline
    ends = [xs[-1] for runs in groups.values() for r in finished(runs)
            if head and (xs := r.curve("val", axis, head.val_key)[0]).size]  # fmt: skip
    budget = min(ends) if ends else math.nan
    rows = []
    for name, runs in groups.items():
        done = finished(runs)
        reads = {s.key: [read_at(r, axis, s, budget) for r in done] for s in scores.scores()}
        reached = sum(math.isfinite(v) for v in reads[head.key]) if head else 0
        rows.append(BudgetRow(name, len(done), reached, estimate(final_values(runs, BUDGET_AXES[axis])),
                              {k: estimate(v) for k, v in reads.items()}))  # fmt: skip
    reached = {row.group: (row.reached, row.finished) for row in rows}
    comparisons = []
    if math.isfinite(budget):
        for a, b, factor in group_pairs(groups, primary):
            short = any(reached[g][0] < reached[g][1] for g in (a, b))
            for score in scores.scores():
                c = compare(a, b, groups[a], groups[b], factor, score, scores.higher(score.metric), axis,
                            lambda r: read_at(r, axis, score, budget))  # fmt: skip
                if short:
                    c.refused = NOT_REACHED
                elif refuse_all and c.refused is None:
                    c.refused = refuse_all
                comparisons.append(c)
    return BudgetTable(axis, budget, rows, comparisons, refuse_all)


# -- machine load and packing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadRow:
    group: str
    mean: float  # 1-minute load average over the training lines of the group's finished runs
    low: float
    high: float
    lines: int
    pack_sizes: list[int]  # distinct pack_size of the finished runs (empty: not recorded)


@dataclass
class LoadReport:
    rows: list[LoadRow]
    spread: float  # max - min of the load over every training line of the finished runs
    load_warning: bool  # spread > LOAD_SPREAD_LIMIT
    pack_warning: bool  # groups were trained with different pack sizes

    @property
    def refusal(self) -> str | None:
        """Why wall-clock comparisons give no verdict (UNEVEN_LOAD, else MIXED_PACKING), or None."""
        return UNEVEN_LOAD if self.load_warning else MIXED_PACKING if self.pack_warning else None


def load_report(groups: Mapping[str, Sequence[RunRecord]]) -> LoadReport:
    rows, everything = [], []
    for name, runs in groups.items():
        loads = [float(r["loadavg"]) for run in finished(runs) for r in run.metrics
                 if r.get("kind") == "train" and is_number(r.get("loadavg")) and math.isfinite(r["loadavg"])]  # fmt: skip
        everything += loads
        packs = sorted({int(p) for run in finished(runs) if math.isfinite(p := run.final_number("pack_size"))})
        rows.append(LoadRow(name, float(np.mean(loads)) if loads else math.nan,
                            min(loads, default=math.nan), max(loads, default=math.nan), len(loads), packs))  # fmt: skip
    spread = max(everything) - min(everything) if everything else math.nan
    packs = {p for row in rows for p in row.pack_sizes}
    return LoadReport(rows, spread, spread > LOAD_SPREAD_LIMIT, len(packs) > 1)


def flops_ratios(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, float]:
    """Each group's mean training FLOPs relative to the cheapest group's (NaN where not measured)."""
    means = {name: mean_of(final_values(runs, "train_flops")) for name, runs in groups.items()}
    cheapest = min((m for m in means.values() if m > 0), default=math.nan)
    return {name: m / cheapest for name, m in means.items()}

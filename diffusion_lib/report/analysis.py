"""The numbers of a study report: `analyse(runs, primary)` computes everything one report needs from the
modules beside it (scores, yardsticks, comparisons, budgets, landscape, tables); markdown.py and plots.py
only present it.

Every function there returns plain data (dataclasses, dicts, lists of floats); nothing formats text or
draws. A run's numbers come only from its RunRecord (final.json, metrics.jsonl, config.yaml); the
metric names, their directions and labels, and the held-out set names come from the runs' final.json
("metrics", "metric_labels", "sets"), so nothing knows which task made them.

Rules (the report states them too):
- Groups are strategy label + sweep values; two groups are compared when they differ in one factor.
- Pairing: runs of two groups that share a seed share initial weights, batches and noise, so the
  per-seed differences are tested (paired t test) when at least two seeds are shared by finished runs
  of both groups; runs without a partner are left out of it. Otherwise Welch's test on every value.
- "better" follows each metric's direction: lower for an error, higher for an accuracy.
- A declared primary comparison (study.yaml `primary`) is tested uncorrected, on EMA and raw; every
  other test in the report is one Holm-Bonferroni family, and its verdict uses the adjusted p.
- Convergence: a group is "not converged" when the mean over seeds of the improvement of its headline
  metric (EMA, first held-out set) over the last fifth of training exceeds the standard deviation across
  seeds of its final value.
- EMA lag: a group's EMA view describes lag rather than a model when its EMA horizon (update interval /
  (1 - decay at the end)) exceeds the last fifth of training, or when its EMA headline score is worse
  than its raw one by more than their seed spread on some set; then the raw view leads the report.
- Machine load: wall-clock views are flagged when the 1-minute load average over all training lines
  of the finished runs spans more than LOAD_SPREAD_LIMIT, or when groups were packed differently;
  then the wall-clock read-off gives no verdicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from diffusion_lib.harness.run_dir import RunRecord
from diffusion_lib.report.budgets import BudgetTable, LoadReport, budget_table, flops_ratios, load_report
from diffusion_lib.report.comparisons import (
    Comparison, Disagreement, DisagreementPattern, PrimarySpec, common_budget_flops, disagreement_patterns,
    disagreements, final_comparisons, parse_primary,
)
from diffusion_lib.report.landscape import Landscape, inference_steps, inference_table, landscape
from diffusion_lib.report.scores import Estimate, Scoring, group_runs, scoring, tally
from diffusion_lib.report.stats import holm
from diffusion_lib.report.tables import (
    DiagnosticsRow, EmaLag, GroupRow, LostValue, Problem, YardstickStanding, code_versions, group_row, lost_values,
    mining_diagnostics, problems, yardstick_standing,
)
from diffusion_lib.report.yardsticks import YardstickRow, yardstick_points, yardstick_table


@dataclass
class StudyAnalysis:
    tally: dict[str, int]
    seeds: list[int]
    scoring: Scoring
    groups: list[GroupRow]
    yardsticks: dict[str, list[YardstickRow]]
    primary: PrimarySpec | None
    comparisons: list[Comparison]  # at the end of training, primary first
    budgets: list[BudgetTable]  # flops, train_seconds
    equal_flops: float  # the FLOP budget every finished run trained to, or NaN
    load: LoadReport
    disagreements: list[Disagreement]
    diagnostics: list[DiagnosticsRow]
    inference_steps: list[str]
    inference: dict[str, dict[str, dict[str, Estimate]]]
    problems: list[Problem]
    standing: list[YardstickStanding]  # on the leading basis
    family_size: int  # tests in the Holm family
    flops_ratio: dict[str, float]  # group -> its mean training FLOPs / the smallest group mean
    landscape: Landscape  # its tests are a Holm family of their own
    yardstick_points: dict[str, dict[str, list[YardstickRow]]]  # per swept task value (empty: none swept)
    lost: list[LostValue]  # non-finite scores of finished runs, left out of their group's means
    code: dict[str, int]  # finished runs per code that made them (tables.code_versions)

    @property
    def primary_comparisons(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.primary]

    @property
    def lagging(self) -> list[EmaLag]:
        """Groups whose EMA view describes lag rather than a model."""
        return [g.lag for g in self.groups if g.lag.lagging]

    @property
    def lead_basis(self) -> str:
        """The view the report leads with: raw when any group's EMA describes lag, else EMA."""
        return "raw" if self.lagging else "ema"

    @property
    def patterns(self) -> list[DisagreementPattern]:
        return disagreement_patterns(self.disagreements)


def analyse(runs: Sequence[RunRecord], primary: Mapping[str, Any] | None = None) -> StudyAnalysis:
    """Every number of the report for `runs`; `primary` as declared in study.yaml (or None)."""
    groups, scores = group_runs(runs), scoring(runs)
    spec = parse_primary(primary, runs, scores)
    active = spec if spec and spec.active else None
    comparisons = final_comparisons(groups, scores, active)
    load = load_report(groups)
    strategies = (active.a, active.b) if active else None
    budgets = [budget_table(groups, scores, "flops", strategies, None),
               budget_table(groups, scores, "train_seconds", strategies, load.refusal)]  # fmt: skip
    family = [c for c in [*comparisons, *(c for t in budgets for c in t.comparisons)]
              if not c.primary and c.refused is None and math.isfinite(c.p)]  # fmt: skip
    for c, adjusted in zip(family, holm([c.p for c in family])):
        c.p_adjusted = adjusted
    rows = [group_row(n, g, scores) for n, g in groups.items()]
    lead = "raw" if any(g.lag.lagging for g in rows) else "ema"
    steps = inference_steps(runs)
    return StudyAnalysis(
        tally(runs), sorted({r.seed for r in runs}), scores, rows, yardstick_table(runs, scores), spec, comparisons,
        budgets, common_budget_flops(runs), load, disagreements(comparisons, budgets[0].comparisons),
        mining_diagnostics(groups), steps, inference_table(groups, scores, steps), problems(runs),
        yardstick_standing(rows, scores, lead), len(family), flops_ratios(groups), landscape(groups, scores),
        yardstick_points(runs, scores), lost_values(runs, scores), code_versions(runs),
    )  # fmt: skip

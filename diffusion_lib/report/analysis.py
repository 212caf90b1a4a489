"""The numbers of a study report: groups, paired tests, Holm's adjustment, budgets, yardsticks, convergence.

Every function returns plain data (dataclasses, dicts, lists of floats); nothing here formats text or
draws. `analyse(runs, primary)` computes everything one report needs; report.py and plots.py only
present it. A run's numbers come only from its RunRecord (final.json, metrics.jsonl, config.yaml); the
metric names, their directions and labels, and the held-out set names come from the runs' final.json
("metrics", "metric_labels", "sets"), so nothing here knows which task made them.

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
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RUN_STATUSES, RunRecord, is_number
from diffusion_lib.report.stats import holm, interpolate_at, mean_ci, paired_test, verdict, welch_test

ALPHA = 0.05
BASES = {"ema": "EMA", "raw": "raw"}
# budget read-off axes: val-line key -> final.json key of the same quantity
BUDGET_AXES = {"flops": "train_flops", "train_seconds": "train_seconds"}
CONFIG_COLUMNS = ("task.dataset", "task.rank", "train.steps", "train.batch_size", "train.lr", "model.hidden_dim",
                  "train.budget_flops")  # fmt: skip
RUN_COLUMNS = ("train_seconds", "steps_per_second", "train_flops", "flops_per_step", "pack_size", "energy_grad_evals")
CODE_COLUMNS = ("git_commit", "git_dirty")  # which code made the row
DIAGNOSTICS = ("accept_rate", "energy_decrease", "move_rms")
LAST_FRACTION = 0.2  # "the end of training" for convergence, EMA lag and mining diagnostics: its last fifth
LOAD_SPREAD_LIMIT = 0.5
# config.yaml keys of the EMA (ema.py): decay, update interval, warm-up start and power
EMA_KEYS = {"decay": "train.ema_decay", "every": "train.ema_every", "after": "train.ema_update_after_step",
            "power": "train.ema_power"}  # fmt: skip
# why a comparison gives no verdict (Comparison.refused); report.py words them
NO_VALUES, TOO_FEW, NOT_REACHED, UNEVEN_LOAD, MIXED_PACKING = (
    "no values", "too few values", "budget not reached", "uneven load", "mixed packing")
_ABSENT = object()  # a factor a group does not set (differs from every real value)


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
    """How many runs have each status."""
    return {status: sum(r.status == status for r in runs) for status in RUN_STATUSES}


def _mean_of(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _sd(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


# -- yardsticks ------------------------------------------------------------------------------------------
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
                rows.append(YardstickRow(name, metric, _mean_of(values), low, high, len(values)))
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


# -- convergence -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Convergence:
    """The headline val score (EMA, first set) over the last fifth of training, across a group's seeds."""

    drop: float  # mean over seeds of the improvement from 80 % of the last val step to the end (> 0: improved)
    seed_sd: float  # standard deviation across seeds of the final val score
    n: int  # seeds with a val curve covering the last fifth

    @property
    def status(self) -> str:
        """converged | not converged | n/a (fewer than two seeds: no seed noise to compare with)."""
        if self.n < 2:
            return "n/a"
        return "not converged" if self.drop > self.seed_sd else "converged"


def convergence(runs: Sequence[RunRecord], headline: Score | None, higher: bool) -> Convergence:
    drops, finals = [], []
    for run in finished(runs) if headline else ():
        steps, values = run.curve("val", "step", headline.val_key)
        if steps.size < 2:
            continue
        start = interpolate_at(steps, values, (1 - LAST_FRACTION) * steps[-1])
        if math.isfinite(start):
            drops.append(values[-1] - start if higher else start - values[-1])
            finals.append(values[-1])
    if not drops:
        return Convergence(math.nan, math.nan, 0)
    return Convergence(float(np.mean(drops)), _sd(finals), len(drops))


# -- EMA lag ---------------------------------------------------------------------------------------------
def ema_horizon(run: RunRecord) -> float:
    """Steps the run's EMA averaged over at its last step: update interval / (1 - decay then), the decay
    after ema.py's warm-up (a copy until update_after_step, then min(decay, 1 - (1 + since)^-power)).
    NaN when config.yaml lacks the EMA settings."""
    config, step = run.config or {}, run.final_number("step")
    values = {name: config.get(key) for name, key in EMA_KEYS.items()}
    if not all(is_number(v) for v in values.values()) or not math.isfinite(step):
        return math.nan
    since = step - values["after"]
    decay = 0.0 if since <= 0 else min(values["decay"], 1 - (1 + since) ** -values["power"])
    return values["every"] / (1 - decay)


@dataclass(frozen=True)
class EmaLag:
    """Whether a group's EMA model describes its training's lag rather than a model."""

    group: str
    horizon: float  # mean over finished runs of ema_horizon, in steps
    fraction: float  # mean over finished runs of horizon / the run's steps
    gap: dict[str, float]  # per set, headline metric: mean over seeds of EMA minus raw, > 0 when the EMA is worse
    spread: dict[str, float]  # per set: the larger of the EMA's and the raw model's seed standard deviations
    ratio: dict[str, float]  # per set: mean EMA / mean raw score

    @property
    def long_horizon(self) -> bool:
        return self.fraction > LAST_FRACTION

    @property
    def far_sets(self) -> list[str]:
        """Sets where the EMA is worse than the raw model by more than their seed spread."""
        return [s for s, gap in self.gap.items() if gap > self.spread[s]]  # NaN spread (one seed) compares False

    @property
    def lagging(self) -> bool:
        return self.long_horizon or bool(self.far_sets)


def ema_lag(name: str, runs: Sequence[RunRecord], scores: Scoring) -> EmaLag:
    done = finished(runs)
    fractions = [ema_horizon(r) / r.final_number("step") for r in done if r.final_number("step") > 0]
    gap, spread, ratio = {}, {}, {}
    if scores.headline:
        sign = -1.0 if scores.higher(scores.headline.metric) else 1.0
        for set_name in scores.sets:
            score = Score(scores.headline.metric, set_name, "ema")
            ema, raw = ([r.final_number(s.key) for r in done] for s in (score, score.on("raw")))
            gap[set_name] = _mean_of([sign * (e - w) for e, w in zip(ema, raw)])
            spreads = (_sd(ema), _sd(raw))
            spread[set_name] = max(spreads) if all(map(math.isfinite, spreads)) else math.nan
            ratio[set_name] = _mean_of(ema) / _mean_of(raw) if _mean_of(raw) else math.nan
    return EmaLag(name, _mean_of([ema_horizon(r) for r in done]), _mean_of(fractions), gap, spread, ratio)


# -- per-group table -------------------------------------------------------------------------------------
@dataclass
class GroupRow:
    group: str
    strategy: str
    sweep: dict[str, Any]
    runs: int
    seeds: list[int]  # of the finished runs
    values: dict[str, Estimate]  # by Score.key, every score of the study
    steps: Estimate
    train_flops: Estimate
    train_seconds: Estimate
    steps_per_second: Estimate
    # basis -> set -> yardstick -> standing of the group's mean headline score (see `standing`)
    vs_yardstick: dict[str, dict[str, dict[str, str]]]
    convergence: Convergence
    lag: EmaLag

    @property
    def finished(self) -> int:
        return len(self.seeds)


def final_values(runs: Sequence[RunRecord], key: str) -> list[float]:
    """Finite `final[key]` of each finished run that has it."""
    return [v for r in finished(runs) if math.isfinite(v := r.final_number(key))]


BEATS, LEVEL, BEHIND = "beats", "level with", "behind"


def standing(e: Estimate, level: float, higher: bool) -> str | None:
    """A group's score against a yardstick: level with it when the yardstick lies inside the group's 95 %
    CI, otherwise beats or behind by the metric's direction; None when either is missing."""
    if not (math.isfinite(e.mean) and math.isfinite(level)):
        return None
    if math.isfinite(e.half) and abs(e.mean - level) <= e.half:
        return LEVEL
    return BEATS if (e.mean > level if higher else e.mean < level) else BEHIND


def group_row(name: str, runs: Sequence[RunRecord], scores: Scoring) -> GroupRow:
    values = {s.key: estimate(final_values(runs, s.key)) for s in scores.scores()}
    sticks = yardstick_names(runs)
    vs: dict[str, dict[str, dict[str, str]]] = {basis: {} for basis in BASES}
    for basis in BASES:
        for set_name in scores.sets if scores.headline else ():
            score = Score(scores.headline.metric, set_name, basis)
            vs[basis][set_name] = {
                stick: standing(values[score.key], _mean_of([yardstick(r, set_name, stick, score.metric)
                                                             for r in finished(runs)]), scores.higher(score.metric))
                for stick in sticks
            }  # fmt: skip
    higher = scores.higher(scores.headline.metric) if scores.headline else False
    return GroupRow(
        name, runs[0].strategy, dict(runs[0].sweep), len(runs), [r.seed for r in finished(runs)], values,
        estimate(final_values(runs, "step")), estimate(final_values(runs, "train_flops")),
        estimate(final_values(runs, "train_seconds")), estimate(final_values(runs, "steps_per_second")),
        vs, convergence(runs, scores.headline, higher), ema_lag(name, runs, scores),
    )  # fmt: skip


@dataclass(frozen=True)
class YardstickStanding:
    """Which groups' final headline score (of `basis`) beats, or is level with, a yardstick of their own
    runs, on one held-out set."""

    set: str
    name: str
    basis: str
    rated: list[str]  # groups with both a final score and that yardstick
    beaten_by: list[str]
    level_with: list[str]


def yardstick_standing(rows: Sequence[GroupRow], scores: Scoring, basis: str) -> list[YardstickStanding]:
    """Per held-out set and yardstick that any group is rated against."""
    found = []
    for set_name in scores.sets:
        for name in dict.fromkeys(n for g in rows for n in g.vs_yardstick[basis].get(set_name, {})):
            marks = {g.group: g.vs_yardstick[basis][set_name].get(name) for g in rows if set_name in g.vs_yardstick[basis]}
            rated = [g for g, mark in marks.items() if mark is not None]
            if rated:
                found.append(YardstickStanding(set_name, name, basis, rated, [g for g in rated if marks[g] == BEATS],
                                               [g for g in rated if marks[g] == LEVEL]))  # fmt: skip
    return found


# -- comparisons -----------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Group `a` vs group `b` (differing only in `factor`) on one score, read at the end of training
    (view "steps") or at a matched budget (view "flops" | "train_seconds")."""

    a: str
    b: str
    factor: str
    score: Score
    higher_is_better: bool  # the score's direction: the verdict's "better" follows it
    view: str
    test: str  # "paired" | "Welch" | "sign-flip" | "permutation" (exact, no spread) | "none"
    n_a: int  # values of a in the test (= n_pairs when paired)
    n_b: int
    unpaired: list[str]  # run ids of finished runs left out of a paired test: their partner has no value
    mean_a: float
    mean_b: float
    diff: float  # A - B (paired: mean of per-seed differences)
    ci_low: float
    ci_high: float
    p: float  # uncorrected two-sided p
    primary: bool = False
    refused: str | None = None  # why there is no verdict: NO_VALUES, TOO_FEW, NOT_REACHED, UNEVEN_LOAD, MIXED_PACKING
    p_adjusted: float = math.nan  # Holm-adjusted over the report's family (NaN for primary and untested)
    equal_flops: float = math.nan  # the FLOP budget every finished run of both groups trained to, if one

    @property
    def effect_pct(self) -> float:
        """diff as % of B's mean (its sign is A - B's; whether that is better follows the direction)."""
        return 100 * self.diff / self.mean_b if self.mean_b else math.nan

    @property
    def verdict_p(self) -> float:
        """The p-value the verdict is taken on: uncorrected for the primary, Holm-adjusted otherwise."""
        return self.p if self.primary else self.p_adjusted

    @property
    def verdict(self) -> str:
        """better | worse | no detectable difference (at ALPHA) | n/a (no test or refused)."""
        if self.refused is not None or math.isnan(self.verdict_p):
            return "n/a"
        return verdict(self.diff, self.verdict_p, ALPHA, self.higher_is_better)


def differing_factor(a: RunRecord, b: RunRecord) -> str | None:
    """The one factor (strategy or sweep key) in which two groups differ, else None."""
    fa, fb = {"strategy": a.strategy, **a.sweep}, {"strategy": b.strategy, **b.sweep}
    differ = [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k, _ABSENT) != fb.get(k, _ABSENT)]
    return differ[0] if len(differ) == 1 else None


def compare(
    a: str, b: str, runs_a: Sequence[RunRecord], runs_b: Sequence[RunRecord], factor: str, score: Score,
    higher: bool, view: str, value: Callable[[RunRecord], float],
) -> Comparison:
    """Paired test on the seeds both groups have a value for (when >= 2), else Welch on every value."""
    va = {r.seed: (r.run_id, v) for r in finished(runs_a) if math.isfinite(v := value(r))}
    vb = {r.seed: (r.run_id, v) for r in finished(runs_b) if math.isfinite(v := value(r))}
    shared = [s for s in va if s in vb]
    if len(shared) >= 2:
        xa, xb = [va[s][1] for s in shared], [vb[s][1] for s in shared]
        result = paired_test(xa, xb)
        unpaired = [run_id for side in (va, vb) for s, (run_id, _) in side.items() if s not in shared]
    else:
        xa, xb = [v for _, v in va.values()], [v for _, v in vb.values()]
        result = welch_test(xa, xb)
        unpaired = []
    testable = math.isfinite(result.p_value)
    return Comparison(
        a, b, factor, score, higher, view, result.test if testable else "none", len(xa), len(xb), unpaired,
        float(np.mean(xa)) if xa else math.nan, float(np.mean(xb)) if xb else math.nan,
        result.diff, result.ci_low, result.ci_high, result.p_value,
        refused=None if testable else NO_VALUES if not xa or not xb else TOO_FEW,
    )  # fmt: skip


def group_pairs(
    groups: Mapping[str, Sequence[RunRecord]], primary: tuple[str, str] | None
) -> list[tuple[str, str, str]]:
    """(a, b, factor) for every two groups differing in one factor: 'later vs earlier' group, except that
    a pair matching the primary strategies is oriented as declared (A vs B)."""
    names = list(groups)
    pairs = []
    for j, later in enumerate(names):
        for earlier in names[:j]:
            factor = differing_factor(groups[later][0], groups[earlier][0])
            if factor is None:
                continue
            if factor == "strategy" and (groups[earlier][0].strategy, groups[later][0].strategy) == primary:
                pairs.append((earlier, later, factor))
            else:
                pairs.append((later, earlier, factor))
    return pairs


def is_primary_pair(groups: Mapping[str, Sequence[RunRecord]], a: str, b: str, primary: tuple[str, str] | None) -> bool:
    return primary is not None and (groups[a][0].strategy, groups[b][0].strategy) == primary


def common_budget_flops(runs: Sequence[RunRecord]) -> float:
    """The train.budget_flops every finished run trained to (> 0), or NaN when they differ or none did."""
    budgets = {r.final_number("budget_flops") for r in finished(runs)}
    if len(budgets) == 1 and (budget := budgets.pop()) > 0:
        return budget
    return math.nan


def final_comparisons(
    groups: Mapping[str, Sequence[RunRecord]], scores: Scoring, primary: PrimarySpec | None
) -> list[Comparison]:
    """Every one-factor pair on every score at the end of training; primary comparisons first."""
    strategies = (primary.a, primary.b) if primary else None
    comparisons = []
    for a, b, factor in group_pairs(groups, strategies):
        equal = common_budget_flops([*groups[a], *groups[b]])
        for score in scores.scores():
            c = compare(a, b, groups[a], groups[b], factor, score, scores.higher(score.metric), "steps",
                        lambda r: r.final_number(score.key))  # fmt: skip
            c.primary = primary is not None and is_primary_pair(groups, a, b, strategies) and score.name == primary.score
            c.equal_flops = equal
            comparisons.append(c)
    return sorted(comparisons, key=lambda c: not c.primary)  # stable: otherwise in pair and score order


# -- matched budgets -------------------------------------------------------------------------------------
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


# -- mining diagnostics ----------------------------------------------------------------------------------
@dataclass
class DiagnosticsRow:
    group: str
    values: dict[str, float]  # DIAGNOSTICS key -> mean over seeds of the last-fifth mean (NaN: absent)
    accept_rate_steps: list[float]  # per inner step i = 1..opt_steps, same averaging (empty: absent)
    n: int  # seeds with any diagnostic


def _last_fifth(run: RunRecord) -> list[dict[str, Any]]:
    lines = [r for r in run.metrics if r.get("kind") == "train" and is_number(r.get("step"))]
    if not lines:
        return []
    end = max(r["step"] for r in lines)
    return [r for r in lines if r["step"] >= (1 - LAST_FRACTION) * end]


def mining_diagnostics(groups: Mapping[str, Sequence[RunRecord]]) -> list[DiagnosticsRow]:
    """Per group, each diagnostic averaged over the last fifth of each run's training, then over seeds."""
    rows = []
    for name, runs in groups.items():
        per_run = {key: [] for key in DIAGNOSTICS}
        steps: list[list[float]] = []
        for run in finished(runs):
            lines = _last_fifth(run)
            for key in DIAGNOSTICS:
                per_run[key].append(_mean_of([float(r[key]) for r in lines if is_number(r.get(key))]))
            lists = [r["accept_rate_steps"] for r in lines if isinstance(r.get("accept_rate_steps"), list)]
            if lists:
                width = Counter(len(x) for x in lists).most_common(1)[0][0]  # opt_steps of the run
                steps.append([_mean_of([float(x[i]) for x in lists if len(x) == width and is_number(x[i])])
                              for i in range(width)])  # fmt: skip
        width = max((len(s) for s in steps), default=0)
        per_step = [_mean_of([s[i] for s in steps if i < len(s)]) for i in range(width)]
        with_data = sum(any(math.isfinite(per_run[k][i]) for k in DIAGNOSTICS) for i in range(len(finished(runs))))
        rows.append(DiagnosticsRow(name, {k: _mean_of(v) for k, v in per_run.items()}, per_step, with_data))
    return rows


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


# -- test-time compute -----------------------------------------------------------------------------------
def inference_steps(runs: Sequence[RunRecord]) -> list[str]:
    """The inference inner-step counts any finished run was scored with, in numeric order."""
    keys = {k for r in finished(runs) if isinstance(s := r.final.get("inference_steps_sweep"), dict) for k in s}
    return sorted(keys, key=float)


def sweep_value(run: RunRecord, steps: str, name: str) -> float:
    """The run's EMA score `name` (<metric>_<set>) when sampled with `steps` inner steps; NaN if absent."""
    sweep = run.final.get("inference_steps_sweep") if run.finished else None
    entry = sweep.get(steps) if isinstance(sweep, dict) else None
    value = entry.get(name) if isinstance(entry, dict) else None
    return float(value) if is_number(value) else math.nan


def inference_table(
    groups: Mapping[str, Sequence[RunRecord]], scores: Scoring, steps: Sequence[str]
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """group -> <metric>_<set> -> inner steps -> EMA score over finished seeds."""
    return {name: {n: {k: estimate([sweep_value(r, k, n) for r in runs]) for k in steps} for n in scores.names}
            for name, runs in groups.items()}  # fmt: skip


# -- problems and the per-run summary --------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    run_id: str
    group: str
    seed: int
    status: str  # failed | missing | damaged
    reason: str | None  # the run's error, or what is wrong with its final.json
    step: int | None  # failed: the step it stopped at; otherwise the last logged step


def problems(runs: Sequence[RunRecord]) -> list[Problem]:
    """Every run that did not finish, failed first, then missing, then damaged."""
    found = []
    for status in ("failed", "missing", "damaged"):
        for run in (r for r in runs if r.status == status):
            logged = [r["step"] for r in run.metrics if is_number(r.get("step"))]
            step = run.final.get("step") if status == "failed" else max(logged, default=None)
            reason = run.final.get("error") if status == "failed" else run.damage
            found.append(Problem(run.run_id, run.group, run.seed, status, reason, step))
    return found


def _sweep_keys(runs: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(key for run in runs for key in run.sweep))


def _final_columns(runs: Sequence[RunRecord]) -> list[str]:
    """Every score any run declares (metric-major, EMA then raw), then compute, then the landscape's numbers."""
    landscape_keys = dict.fromkeys(k for r in finished(runs) for k in landscape_columns(r.final))
    return [*dict.fromkeys(s.key for s in scoring(runs).scores()), *RUN_COLUMNS, *landscape_keys]


def summary_columns(runs: Sequence[RunRecord]) -> list[str]:
    """The columns of `summary_rows`: sweep keys (first-seen order), config columns not swept, scores and
    compute, the code that made the run."""
    sweep = _sweep_keys(runs)
    config = [k for k in CONFIG_COLUMNS if k not in sweep]
    return ["run_id", "group", "strategy", *sweep, "seed", "status", *config, *_final_columns(runs), *CODE_COLUMNS,
            "steps", "error"]  # fmt: skip


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, in the order of `runs`; every row has every column (None where absent)."""
    sweep, numbers = _sweep_keys(runs), _final_columns(runs)
    rows = []
    for run in runs:
        final = run.final or {}
        row: dict[str, Any] = {"run_id": run.run_id, "group": run.group, "strategy": run.strategy}
        row.update({key: run.sweep.get(key) for key in sweep})
        row.update(seed=run.seed, status=run.status)
        row.update({key: (run.config or {}).get(key) for key in CONFIG_COLUMNS if key not in sweep})
        flat = {**final, **landscape_columns(final)} if run.finished else final
        row.update({key: v if is_number(v := flat.get(key)) and math.isfinite(v) else None for key in numbers})
        row.update({key: final.get(key) for key in CODE_COLUMNS})
        row.update(steps=final.get("step"), error=final.get("error") or run.damage)
        rows.append(row)
    return rows


# -- disagreements ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Disagreement:
    """Two readings of the same question (A vs B on one metric and set) with different verdicts: `kind`
    "model" is EMA (first) vs raw (second) at the end of training; "compute" is equal steps (first) vs
    equal FLOPs (second) on `basis`."""

    a: str
    b: str
    metric: str
    set: str
    kind: str
    basis: str
    first: str  # verdict
    second: str


def disagreements(final: Sequence[Comparison], flops: Sequence[Comparison]) -> list[Disagreement]:
    """EMA vs raw verdicts at the end of training, then equal steps vs equal FLOPs on each basis.
    Only real verdicts count: a comparison without one ("n/a") disagrees with nothing."""
    index = {(c.a, c.b, c.score): c for c in final}
    found = []
    for c in final:
        raw = index.get((c.a, c.b, c.score.on("raw")))
        if c.score.basis == "ema" and raw and "n/a" not in (c.verdict, raw.verdict) and c.verdict != raw.verdict:
            found.append(Disagreement(c.a, c.b, c.score.metric, c.score.set, "model", "ema", c.verdict, raw.verdict))
    for f in flops:
        c = index.get((f.a, f.b, f.score))
        # like with like: the primary's end-of-training verdict is uncorrected, so its read-off is taken so too
        # (otherwise the Holm correction alone could make the two views "disagree")
        f_verdict = verdict(f.diff, f.p, ALPHA, f.higher_is_better) if c and c.primary and f.verdict != "n/a" else f.verdict
        if c and "n/a" not in (c.verdict, f_verdict) and c.verdict != f_verdict:
            found.append(Disagreement(c.a, c.b, c.score.metric, c.score.set, "compute", c.score.basis, c.verdict,
                                      f_verdict))  # fmt: skip
    return found


@dataclass(frozen=True)
class DisagreementPattern:
    """Disagreements of one kind with the same pair of verdicts (e.g. EMA "better", raw "worse")."""

    kind: str  # "model" | "compute"
    first: str
    second: str
    cases: list[Disagreement]

    def pairs(self) -> dict[tuple[str, str], list[Disagreement]]:
        """The cases by compared pair (A, B), in first-seen order."""
        found: dict[tuple[str, str], list[Disagreement]] = {}
        for d in self.cases:
            found.setdefault((d.a, d.b), []).append(d)
        return found


def disagreement_patterns(found: Sequence[Disagreement]) -> list[DisagreementPattern]:
    """The disagreements grouped by kind (EMA vs raw first) and verdict pair, so that a study's many
    disagreements read as the few patterns they are."""
    patterns: dict[tuple[str, str, str], list[Disagreement]] = {}
    for d in sorted(found, key=lambda d: d.kind != "model"):  # stable
        patterns.setdefault((d.kind, d.first, d.second), []).append(d)
    return [DisagreementPattern(*key, cases) for key, cases in patterns.items()]


# -- the whole analysis ----------------------------------------------------------------------------------
@dataclass
class PrimarySpec:
    a: str
    b: str
    score: str  # <metric>_<set>
    missing: list[str]  # declared labels without runs in this study (then nothing is primary)
    unknown: list[str] | None = None  # the scores allowed, when `score` is none of them (then nothing is primary)

    @property
    def active(self) -> bool:
        return not self.missing and self.unknown is None


def parse_primary(primary: Mapping[str, Any] | None, runs: Sequence[RunRecord], scores: Scoring) -> PrimarySpec | None:
    """study.yaml's `primary: {compare: [A, B], metric: <metric>_<set>}`, or None when not declared; the
    metric is checked against what the finished runs declare (none finished: nothing to check)."""
    if not primary:
        return None
    a, b = primary["compare"]
    present = {r.strategy for r in runs}
    name = str(primary["metric"])
    unknown = scores.names if scores.metrics and scores.find(name) is None else None
    return PrimarySpec(a, b, name, [s for s in (a, b) if s not in present], unknown)


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
        yardstick_points(runs, scores),
    )  # fmt: skip


def flops_ratios(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, float]:
    """Each group's mean training FLOPs relative to the cheapest group's (NaN where not measured)."""
    means = {name: _mean_of(final_values(runs, "train_flops")) for name, runs in groups.items()}
    cheapest = min((m for m in means.values() if m > 0), default=math.nan)
    return {name: m / cheapest for name, m in means.items()}


# -- the energy landscape (eval.ranking_scales, eval.best_of; final.json "ranking_<set>", "best_of_<set>") -----
CHANCE = 0.5  # the ranking accuracy of a verifier that cannot tell the true answer from another
PICKS = ("energy", "random", "oracle")


@dataclass
class LandscapeTest:
    """One test of the landscape family, per seed: a group's ranking accuracy against chance ("ranking", `item`
    the distance), two groups' ranking accuracies ("ranking_pair", `group` "A vs B", paired by seed), or a
    group's best-of-N energy pick against a random pick ("best_of", `item` "<n>")."""

    kind: str
    group: str
    set: str
    basis: str
    item: str
    metric: str  # the metric of a best-of test ("" for a ranking)
    higher_is_better: bool
    n: int
    mean_a: float  # ranking accuracy (of A), or the energy pick's value
    mean_b: float  # chance, B's ranking accuracy, or the random pick's value
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_adjusted: float = math.nan

    @property
    def verdict(self) -> str:
        if math.isnan(self.p_adjusted):
            return "n/a"
        return verdict(self.diff, self.p_adjusted, ALPHA, self.higher_is_better)


@dataclass
class FlopCurve:
    """A group's headline error vs FLOPs per answer: the inner-steps sweep or best-of-N (EMA model)."""

    group: str
    set: str
    kind: str  # "inner steps" | "best-of-N"
    points: list[tuple[float, Estimate, str]]  # (mean FLOPs per answer, score over seeds, "5" or "N=4")


@dataclass
class Landscape:
    distances: list[str]
    ranking_levels: list[str]  # every diffusion level ranked at, in order
    ranking_level: str  # the level tested (0 when ranked there: where the last inner steps descend)
    ranking: dict[str, dict[str, dict[str, dict[str, dict[str, Estimate]]]]]  # group -> set -> basis -> level ->
    # distance -> accuracy
    best_of_ns: list[str]
    best_of: dict[str, dict[str, dict[str, dict[str, dict[str, Estimate]]]]]  # group -> set -> basis -> n -> pick
    tests: list[LandscapeTest]
    curves: list[FlopCurve]

    @property
    def present(self) -> bool:
        return bool(self.distances or self.best_of_ns)


def _nested(run: RunRecord, *keys: str) -> Any:
    value: Any = run.final if run.finished else None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _number(value: Any) -> float:
    return float(value) if is_number(value) else math.nan


def ranking_value(run: RunRecord, set_name: str, basis: str, distance: str, level: str) -> float:
    return _number(_nested(run, f"ranking_{set_name}{'_raw' if basis == 'raw' else ''}", distance, level))


def best_of_value(run: RunRecord, set_name: str, basis: str, n: str, metric: str, pick: str) -> float:
    return _number(_nested(run, f"best_of_{set_name}{'_raw' if basis == 'raw' else ''}", n, metric, pick))


def _landscape_keys(runs: Sequence[RunRecord], prefix: str) -> tuple[list[str], list[str]]:
    """(first-level keys, second-level keys) of the finished runs' "<prefix><set>" tables, first seen first."""
    outer: dict[str, None] = {}
    inner: dict[str, None] = {}
    for run in finished(runs):
        for key, table in run.final.items():
            if key.startswith(prefix) and isinstance(table, dict):
                outer.update(dict.fromkeys(table))
                for row in table.values():
                    inner.update(dict.fromkeys(row if isinstance(row, dict) else {}))
    return list(outer), list(inner)


def _test(kind: str, group: str, score: Score, item: str, metric: str, higher: bool,
          a: list[float], b: list[float]) -> LandscapeTest:
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    result = paired_test([x for x, _ in pairs], [y for _, y in pairs])
    mean = lambda v: float(np.mean(v)) if v else math.nan  # noqa: E731
    return LandscapeTest(kind, group, score.set, score.basis, item, metric, higher, len(pairs),
                         mean([x for x, _ in pairs]), mean([y for _, y in pairs]), result.diff, result.ci_low,
                         result.ci_high, result.p_value)


def landscape(groups: Mapping[str, Sequence[RunRecord]], scores: Scoring) -> Landscape:
    """Ranking accuracy per distance and best-of-N picks per group (mean over seeds, EMA and raw); the
    tests of the landscape family (Holm-adjusted among themselves, apart from the comparisons of groups);
    and error-vs-FLOPs curves of the headline metric."""
    runs = [r for g in groups.values() for r in g]
    distances, levels = _landscape_keys(runs, "ranking_")
    levels = sorted(levels, key=int)
    level = "0" if "0" in levels else (levels[0] if levels else "0")
    ns, _ = _landscape_keys(runs, "best_of_")
    ns = sorted(ns, key=int)
    headline = next(iter(scores.metrics), None)
    ranking, best, tests = {}, {}, []
    for group, members in groups.items():
        done = finished(members)
        ranking[group], best[group] = {}, {}
        for score in scores.scores([headline]) if headline else ():
            values = {lv: {d: [ranking_value(r, score.set, score.basis, d, lv) for r in done] for d in distances}
                      for lv in levels}  # fmt: skip
            ranking[group].setdefault(score.set, {})[score.basis] = {
                lv: {d: estimate(v) for d, v in row.items()} for lv, row in values.items()}  # fmt: skip
            tests += [_test("ranking", group, score, d, "", True, v, [CHANCE] * len(v))
                      for d, v in values.get(level, {}).items()]  # fmt: skip
            picks = {n: {p: [best_of_value(r, score.set, score.basis, n, headline, p) for r in done] for p in PICKS}
                     for n in ns}  # fmt: skip
            best[group].setdefault(score.set, {})[score.basis] = {
                n: {**{p: estimate(v) for p, v in row.items()}, "room": estimate(room(row["oracle"], row["random"])),
                    "gain": estimate(gain(row["energy"], row["random"], scores.higher(headline)))}
                for n, row in picks.items()}  # fmt: skip
            tests += [_test("best_of", group, score, n, headline, scores.higher(headline), row["energy"], row["random"])
                      for n, row in picks.items() if n != "1"]
    tests += ranking_pair_tests(groups, scores, distances, level)
    family = [t for t in tests if math.isfinite(t.p)]
    for t, adjusted in zip(family, holm([t.p for t in family])):
        t.p_adjusted = adjusted
    return Landscape(distances, levels, level, ranking, ns, best, tests, flop_curves(groups, scores, ns))


def gain(energy: Sequence[float], random: Sequence[float], higher: bool) -> list[float]:
    """Per seed, how much better the energy pick is than the random pick, in % of the random pick's value
    (negative: worse)."""
    return [((e - r) if higher else (r - e)) / abs(r) * 100 if r else math.nan for e, r in zip(energy, random)]


def room(oracle: Sequence[float], random: Sequence[float]) -> list[float]:
    """Per seed, how far the oracle pick is from the random pick, in % of the random pick's value (either
    direction of metric: the oracle is never the worse of the two)."""
    return [abs(o - r) / abs(r) * 100 if r else math.nan for o, r in zip(oracle, random)]


def ranking_pair_tests(groups: Mapping[str, Sequence[RunRecord]], scores: Scoring, distances: Sequence[str],
                       level: str) -> list[LandscapeTest]:
    """Does one arm's energy rank true answers better than another's? Groups differing in one factor ('later
    vs earlier'), per set, view and distance, paired on the seeds both finished."""
    tests = []
    for a, b, _ in group_pairs(groups, None):
        by_seed = [{r.seed: r for r in finished(groups[name])} for name in (a, b)]
        shared = [seed for seed in by_seed[0] if seed in by_seed[1]]
        for score in scores.scores([next(iter(scores.metrics))]) if distances else ():
            for d in distances:
                va, vb = ([ranking_value(side[seed], score.set, score.basis, d, level) for seed in shared]
                          for side in by_seed)  # fmt: skip
                tests.append(_test("ranking_pair", f"{a} vs {b}", score, d, "", True, va, vb))
    return tests


def flop_curves(groups: Mapping[str, Sequence[RunRecord]], scores: Scoring, ns: Sequence[str]) -> list[FlopCurve]:
    """Per group and set, the headline EMA score against FLOPs per answer: the inner-steps sweep (each count's
    measured FLOPs) and best-of-N's energy pick (N samples and their scoring)."""
    headline = next(iter(scores.metrics), None)
    curves = []
    for group, members in groups.items():
        done = finished(members)
        for set_name in scores.sets if headline else ():
            name = f"{headline}_{set_name}"
            steps = inference_steps(done)
            sweep = [(_mean_of([_number(_nested(r, "inference_steps_sweep_flops", k)) for r in done]),
                      estimate([sweep_value(r, k, name) for r in done]), k) for k in steps]  # fmt: skip
            best = [(_mean_of([_number(_nested(r, f"best_of_{set_name}", n, "flops_per_answer")) for r in done]),
                     estimate([best_of_value(r, set_name, "ema", n, headline, "energy") for r in done]), f"N={n}")
                    for n in ns]  # fmt: skip
            for kind, points in (("inner steps", sweep), ("best-of-N", best)):
                points = [p for p in points if math.isfinite(p[0]) and p[1].n]
                if points:
                    curves.append(FlopCurve(group, set_name, kind, points))
    return curves


def landscape_columns(final: Mapping[str, Any]) -> dict[str, float]:
    """final.json's landscape numbers as flat summary.csv columns: ranking_<set>_<distance>_t<level>[_raw] at
    every level ranked, best_of_<n>_<metric>_<set>_<pick>[_raw], best_of_<n>_flops_per_answer,
    sampler_flops_per_answer; another sampler's (eval.samplers) as <label>__<the same> and its scores."""
    flat: dict[str, float] = {}
    if is_number(final.get("sampler_flops_per_answer")):
        flat["sampler_flops_per_answer"] = float(final["sampler_flops_per_answer"])
    for key, table in final.items():
        if not isinstance(table, dict):
            continue
        raw = "_raw" if key.endswith("_raw") else ""
        base = key[: len(key) - len(raw)]
        if key.startswith("ranking_"):
            for distance, row in table.items():
                for level, value in (row.items() if isinstance(row, dict) else ()):
                    flat[f"{base}_{distance}_t{level}{raw}"] = _number(value)
        elif key.startswith("best_of_"):
            for n, row in table.items():
                for metric, picks in (row.items() if isinstance(row, dict) else ()):
                    if metric == "flops_per_answer":
                        flat[f"best_of_{n}_flops_per_answer"] = _number(picks)
                    elif isinstance(picks, dict):
                        flat.update({f"best_of_{n}_{metric}_{base[8:]}_{p}{raw}": _number(v) for p, v in picks.items()})
    for label, block in (final.get("samplers") or {}).items():
        if isinstance(block, dict):
            scored = {k: float(v) for k, v in block.items() if is_number(v)}
            flat.update({f"{label}__{k}": v for k, v in {**scored, **landscape_columns(block)}.items()})
    return flat

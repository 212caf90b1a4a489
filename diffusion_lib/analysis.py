"""The numbers of a study report: groups, paired tests, Holm's adjustment, budgets, yardsticks, convergence.

Every function returns plain data (dataclasses, dicts, lists of floats); nothing here formats text or
draws. `analyse(runs, primary)` computes everything one report needs; report.py and plots.py only
present it. A run's numbers come only from its RunRecord (final.json, metrics.jsonl, config.yaml).

Rules (the report states them too):
- Groups are strategy label + sweep values; two groups are compared when they differ in one factor.
- Pairing: runs of two groups that share a seed share initial weights, batches and noise, so the
  per-seed differences are tested (paired t test) when at least two seeds are shared by finished runs
  of both groups; runs without a partner are left out of it. Otherwise Welch's test on every value.
- A declared primary comparison (study.yaml `primary`) is tested uncorrected, on EMA and raw; every
  other test in the report is one Holm-Bonferroni family, and its verdict uses the adjusted p.
- Convergence: a group is "not converged" when the mean over seeds of (EMA in-dist val MSE at 80 % of
  training - final val MSE) exceeds the standard deviation across seeds of the final val MSE.
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

from .results import RUN_STATUSES, RunRecord, is_number
from .stats import holm, interpolate_at, mean_ci, paired_test, verdict, welch_test

ALPHA = 0.05
SETS = {"id": "in-distribution", "ood": "ood"}
BASES = {"ema": "EMA", "raw": "raw"}
YARDSTICKS = {  # name -> (short name, what it is)
    "zeros": ("zeros predictor", "predicts all zeros"),
    "train_mean": ("training-mean predictor", "predicts the per-entry mean of the training answers"),
    "linear": ("linear map", "least-squares linear map from vec(A) to the answer, fit on training problems"),
    "clamp_floor": ("clamp floor", "the true answer clamped to ±2: the error clamping alone causes"),
}
# budget read-off axes: val-line key -> final.json key of the same quantity
BUDGET_AXES = {"flops": "train_flops", "train_seconds": "train_seconds"}
CONFIG_COLUMNS = ("task.rank", "train.steps", "train.batch_size", "train.lr", "model.hidden_dim", "train.budget_flops")
FINAL_COLUMNS = ("mse_id", "mse_ood", "mse_id_raw", "mse_ood_raw", "train_seconds", "steps_per_second",
                 "train_flops", "flops_per_step", "pack_size", "energy_grad_evals")
CODE_COLUMNS = ("git_commit", "git_dirty")  # which code made the row (absent outside a git checkout)
DIAGNOSTICS = ("accept_rate", "energy_decrease", "move_rms")
LAST_FRACTION = 0.2  # "the end of training" for convergence and mining diagnostics: its last fifth
LOAD_SPREAD_LIMIT = 0.5
# why a comparison gives no verdict (Comparison.refused); report.py words them
NO_VALUES, TOO_FEW, NOT_REACHED, UNEVEN_LOAD, MIXED_PACKING = (
    "no values", "too few values", "budget not reached", "uneven load", "mixed packing")
_ABSENT = object()  # a factor a group does not set (differs from every real value)


@dataclass(frozen=True)
class Metric:
    """A final error: held-out set ("id" | "ood") and model ("ema" | "raw")."""

    set: str
    basis: str

    @property
    def key(self) -> str:
        """final.json key, e.g. mse_id or mse_ood_raw."""
        return f"mse_{self.set}" + ("_raw" if self.basis == "raw" else "")

    @property
    def val_key(self) -> str:
        """metrics.jsonl val-line key of the same error."""
        return f"val_{self.key}"


METRICS = tuple(Metric(s, b) for s in SETS for b in BASES)


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


# -- yardsticks ------------------------------------------------------------------------------------------
def yardstick(run: RunRecord, set_name: str, name: str) -> float:
    """A finished run's yardstick MSE; old folders only have zeros_mse_<set>. NaN when absent."""
    table = (run.final or {}).get("yardsticks")
    entry = table.get(set_name) if isinstance(table, dict) else None
    if isinstance(entry, dict) and is_number(entry.get(name)):
        return float(entry[name])
    return run.final_number(f"zeros_mse_{set_name}") if name == "zeros" else math.nan


@dataclass(frozen=True)
class YardstickRow:
    name: str
    mean: float  # over finished runs that have it
    low: float
    high: float
    n: int

    @property
    def varies(self) -> bool:
        """More than 1 % apart across runs (e.g. a sweep over the task): one number would mislead."""
        return self.n > 1 and self.high > 1.01 * self.low


def yardstick_table(runs: Sequence[RunRecord]) -> dict[str, list[YardstickRow]]:
    """Per held-out set, each yardstick's mean, min and max over the finished runs."""
    table = {}
    for set_name in SETS:
        rows = []
        for name in YARDSTICKS:
            values = [v for r in finished(runs) if math.isfinite(v := yardstick(r, set_name, name))]
            low, high = (min(values), max(values)) if values else (math.nan, math.nan)
            rows.append(YardstickRow(name, float(np.mean(values)) if values else math.nan, low, high, len(values)))
        table[set_name] = rows
    return table


# -- convergence -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Convergence:
    """EMA in-dist val MSE over the last fifth of training, across a group's seeds."""

    drop: float  # mean over seeds of (val MSE at 80 % of the last val step - final val MSE)
    seed_sd: float  # standard deviation across seeds of the final val MSE
    n: int  # seeds with a val curve covering the last fifth

    @property
    def status(self) -> str:
        """converged | not converged | n/a (fewer than two seeds: no seed noise to compare with)."""
        if self.n < 2:
            return "n/a"
        return "not converged" if self.drop > self.seed_sd else "converged"


def convergence(runs: Sequence[RunRecord]) -> Convergence:
    drops, finals = [], []
    for run in finished(runs):
        steps, mse = run.curve("val", "step", "val_mse_id")
        if steps.size < 2:
            continue
        start = interpolate_at(steps, mse, (1 - LAST_FRACTION) * steps[-1])
        if math.isfinite(start):
            drops.append(start - mse[-1])
            finals.append(mse[-1])
    if not drops:
        return Convergence(math.nan, math.nan, 0)
    sd = float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan
    return Convergence(float(np.mean(drops)), sd, len(drops))


# -- per-group table -------------------------------------------------------------------------------------
@dataclass
class GroupRow:
    group: str
    strategy: str
    sweep: dict[str, Any]
    runs: int
    seeds: list[int]  # of the finished runs
    mse: dict[str, Estimate]  # by Metric.key
    steps: Estimate
    train_flops: Estimate
    train_seconds: Estimate
    steps_per_second: Estimate
    # per set, per yardstick: group's mean EMA MSE / mean yardstick of its runs (< 1: the group beats it)
    vs_yardstick: dict[str, dict[str, float]]
    convergence: Convergence

    @property
    def finished(self) -> int:
        return len(self.seeds)


def final_values(runs: Sequence[RunRecord], key: str) -> list[float]:
    """Finite `final[key]` of each finished run that has it."""
    return [v for r in finished(runs) if math.isfinite(v := r.final_number(key))]


def group_row(name: str, runs: Sequence[RunRecord]) -> GroupRow:
    mse = {m.key: estimate(final_values(runs, m.key)) for m in METRICS}
    ratios = {}
    for set_name in SETS:
        ema = mse[Metric(set_name, "ema").key].mean
        ratios[set_name] = {}
        for stick in YARDSTICKS:
            level = _mean_of([yardstick(r, set_name, stick) for r in finished(runs)])
            ratios[set_name][stick] = ema / level if level > 0 else math.nan
    return GroupRow(
        name, runs[0].strategy, dict(runs[0].sweep), len(runs), [r.seed for r in finished(runs)], mse,
        estimate(final_values(runs, "step")), estimate(final_values(runs, "train_flops")),
        estimate(final_values(runs, "train_seconds")), estimate(final_values(runs, "steps_per_second")),
        ratios, convergence(runs),
    )  # fmt: skip


@dataclass(frozen=True)
class YardstickStanding:
    """Which groups' final EMA MSE beats (is below) a yardstick of their own runs, on one held-out set."""

    set: str
    name: str  # the linear map, or the zeros predictor where the linear map was not recorded (old folders)
    rated: list[str]  # groups with both a final EMA MSE and that yardstick
    beaten_by: list[str]


def yardstick_standing(rows: Sequence[GroupRow]) -> list[YardstickStanding]:
    """Per held-out set that has a yardstick at all."""
    found = []
    for set_name in SETS:
        name = next((n for n in ("linear", "zeros") if any(math.isfinite(g.vs_yardstick[set_name][n]) for g in rows)), None)
        if name is None:
            continue
        rated = [g for g in rows if math.isfinite(g.vs_yardstick[set_name][name])]
        found.append(YardstickStanding(set_name, name, [g.group for g in rated],
                                       [g.group for g in rated if g.vs_yardstick[set_name][name] < 1]))  # fmt: skip
    return found


# -- comparisons -----------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Group `a` vs group `b` (differing only in `factor`) on one metric, read at the end of training
    (view "steps") or at a matched budget (view "flops" | "train_seconds")."""

    a: str
    b: str
    factor: str
    metric: Metric
    view: str
    test: str  # "paired" | "Welch" | "none"
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
        """diff as % of B's mean."""
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
        return verdict(self.diff, self.verdict_p, ALPHA)


def differing_factor(a: RunRecord, b: RunRecord) -> str | None:
    """The one factor (strategy or sweep key) in which two groups differ, else None."""
    fa, fb = {"strategy": a.strategy, **a.sweep}, {"strategy": b.strategy, **b.sweep}
    differ = [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k, _ABSENT) != fb.get(k, _ABSENT)]
    return differ[0] if len(differ) == 1 else None


def compare(
    a: str, b: str, runs_a: Sequence[RunRecord], runs_b: Sequence[RunRecord], factor: str, metric: Metric,
    view: str, value: Callable[[RunRecord], float],
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
        a, b, factor, metric, view, result.test if testable else "none", len(xa), len(xb), unpaired,
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
    groups: Mapping[str, Sequence[RunRecord]], primary: tuple[str, str, str] | None
) -> list[Comparison]:
    """Every one-factor pair on every metric at the end of training; primary comparisons first."""
    strategies = primary[:2] if primary else None
    comparisons = []
    for a, b, factor in group_pairs(groups, strategies):
        equal = common_budget_flops([*groups[a], *groups[b]])
        for metric in METRICS:
            c = compare(a, b, groups[a], groups[b], factor, metric, "steps", lambda r: r.final_number(metric.key))
            c.primary = primary is not None and is_primary_pair(groups, a, b, strategies) and metric.set == primary[2]
            c.equal_flops = equal
            comparisons.append(c)
    return sorted(comparisons, key=lambda c: not c.primary)  # stable: otherwise in pair and metric order


# -- matched budgets -------------------------------------------------------------------------------------
@dataclass
class BudgetRow:
    group: str
    finished: int
    reached: int  # finished runs whose val curve covers the budget
    own_final: Estimate  # the group's own final value on the axis
    mse: dict[str, Estimate]  # by Metric.key, over the runs that reached the budget


@dataclass
class BudgetTable:
    """Validation MSE read off each run's val curve at one budget on `axis` (flops | train_seconds)."""

    axis: str
    budget: float  # the smallest last val point of any finished run (NaN: no run logged the axis)
    rows: list[BudgetRow]
    comparisons: list[Comparison]
    refused: str | None = None  # why no comparison on this axis gives a verdict (UNEVEN_LOAD, MIXED_PACKING)


def read_at(run: RunRecord, axis: str, metric: Metric, budget: float) -> float:
    """The run's validation `metric` read off its val curve at `axis` = budget; NaN if not reached."""
    xs, ys = run.curve("val", axis, metric.val_key)
    return interpolate_at(xs, ys, budget)


def budget_table(
    groups: Mapping[str, Sequence[RunRecord]], axis: str, primary: tuple[str, str] | None, refuse_all: str | None
) -> BudgetTable:
    """Read-offs at the largest budget every finished run's val curve can reach; a comparison gives no
    verdict unless every finished run of both groups reached it (NOT_REACHED), nor when `refuse_all`."""
    ends = [xs[-1] for runs in groups.values() for r in finished(runs)
            if (xs := r.curve("val", axis, "val_mse_id")[0]).size]  # fmt: skip
    budget = min(ends) if ends else math.nan
    rows = []
    for name, runs in groups.items():
        done = finished(runs)
        reads = {m.key: [read_at(r, axis, m, budget) for r in done] for m in METRICS}
        rows.append(BudgetRow(
            name, len(done), sum(math.isfinite(v) for v in reads["mse_id"]),
            estimate(final_values(runs, BUDGET_AXES[axis])), {k: estimate(v) for k, v in reads.items()},
        ))  # fmt: skip
    reached = {row.group: (row.reached, row.finished) for row in rows}
    comparisons = []
    if math.isfinite(budget):
        for a, b, factor in group_pairs(groups, primary):
            short = any(reached[g][0] < reached[g][1] for g in (a, b))
            for metric in METRICS:
                c = compare(a, b, groups[a], groups[b], factor, metric, axis,
                            lambda r: read_at(r, axis, metric, budget))  # fmt: skip
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
    pack_sizes: list[int]  # distinct pack_size of the finished runs (absent in old folders: empty)


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


def _mean_of(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


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


def sweep_value(run: RunRecord, steps: str, set_name: str) -> float:
    sweep = run.final.get("inference_steps_sweep") if run.finished else None
    entry = sweep.get(steps) if isinstance(sweep, dict) else None
    value = entry.get(f"mse_{set_name}") if isinstance(entry, dict) else None
    return float(value) if is_number(value) else math.nan


def inference_table(
    groups: Mapping[str, Sequence[RunRecord]], steps: Sequence[str]
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """group -> set -> inner steps -> EMA MSE over finished seeds."""
    return {name: {s: {k: estimate([sweep_value(r, k, s) for r in runs]) for k in steps} for s in SETS}
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


def summary_columns(runs: Sequence[RunRecord]) -> list[str]:
    """The columns of `summary_rows`: sweep keys (first-seen order), then config columns not swept."""
    sweep = _sweep_keys(runs)
    config = [k for k in CONFIG_COLUMNS if k not in sweep]
    return ["run_id", "group", "strategy", *sweep, "seed", "status", *config, *FINAL_COLUMNS, "steps", "error",
            *CODE_COLUMNS]


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, in the order of `runs`; every row has every column (None where absent)."""
    sweep = _sweep_keys(runs)
    rows = []
    for run in runs:
        final = run.final or {}
        row: dict[str, Any] = {"run_id": run.run_id, "group": run.group, "strategy": run.strategy}
        row.update({key: run.sweep.get(key) for key in sweep})
        row.update(seed=run.seed, status=run.status)
        row.update({key: (run.config or {}).get(key) for key in CONFIG_COLUMNS if key not in sweep})
        row.update({key: v if math.isfinite(v := run.final_number(key)) else None for key in FINAL_COLUMNS})
        row.update(steps=final.get("step"), error=final.get("error") or run.damage)
        row.update({key: final.get(key) for key in CODE_COLUMNS})
        rows.append(row)
    return rows


# -- disagreements ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Disagreement:
    """Two readings of the same question (A vs B on one set) with different verdicts: `kind` "model" is
    EMA (first) vs raw (second) at the end of training; "compute" is equal steps (first) vs equal FLOPs
    (second) on `basis`."""

    a: str
    b: str
    set: str
    kind: str
    basis: str
    first: str  # verdict
    second: str


def disagreements(final: Sequence[Comparison], flops: Sequence[Comparison]) -> list[Disagreement]:
    """EMA vs raw verdicts at the end of training, then equal steps vs equal FLOPs on each basis.
    Only real verdicts count: a comparison without one ("n/a") disagrees with nothing."""
    index = {(c.a, c.b, c.metric): c for c in final}
    found = []
    for c in final:
        raw = index.get((c.a, c.b, Metric(c.metric.set, "raw")))
        if c.metric.basis == "ema" and raw and "n/a" not in (c.verdict, raw.verdict) and c.verdict != raw.verdict:
            found.append(Disagreement(c.a, c.b, c.metric.set, "model", "ema", c.verdict, raw.verdict))
    for f in flops:
        c = index.get((f.a, f.b, f.metric))
        # like with like: the primary's end-of-training verdict is uncorrected, so its read-off is taken so too
        # (otherwise the Holm correction alone could make the two views "disagree")
        f_verdict = verdict(f.diff, f.p, ALPHA) if c and c.primary and f.verdict != "n/a" else f.verdict
        if c and "n/a" not in (c.verdict, f_verdict) and c.verdict != f_verdict:
            found.append(Disagreement(c.a, c.b, c.metric.set, "compute", c.metric.basis, c.verdict, f_verdict))
    return found


# -- the whole analysis ----------------------------------------------------------------------------------
@dataclass
class PrimarySpec:
    a: str
    b: str
    set: str  # "id" | "ood"
    missing: list[str]  # declared labels without runs in this study (then nothing is primary)


def parse_primary(primary: Mapping[str, Any] | None, runs: Sequence[RunRecord]) -> PrimarySpec | None:
    """study.yaml's `primary: {compare: [A, B], metric: mse_id | mse_ood}`, or None when not declared."""
    if not primary:
        return None
    a, b = primary["compare"]
    present = {r.strategy for r in runs}
    return PrimarySpec(a, b, str(primary["metric"]).removeprefix("mse_"), [s for s in (a, b) if s not in present])


@dataclass
class StudyAnalysis:
    tally: dict[str, int]
    seeds: list[int]
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
    standing: list[YardstickStanding]
    family_size: int  # tests in the Holm family
    flops_ratio: dict[str, float]  # group -> its mean training FLOPs / the smallest group mean

    @property
    def primary_comparisons(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.primary]


def analyse(runs: Sequence[RunRecord], primary: Mapping[str, Any] | None = None) -> StudyAnalysis:
    """Every number of the report for `runs`; `primary` as declared in study.yaml (or None)."""
    groups = group_runs(runs)
    spec = parse_primary(primary, runs)
    active = (spec.a, spec.b, spec.set) if spec and not spec.missing else None
    comparisons = final_comparisons(groups, active)
    load = load_report(groups)
    strategies = active[:2] if active else None
    budgets = [budget_table(groups, "flops", strategies, None),
               budget_table(groups, "train_seconds", strategies, load.refusal)]  # fmt: skip
    family = [c for c in [*comparisons, *(c for t in budgets for c in t.comparisons)]
              if not c.primary and c.refused is None and math.isfinite(c.p)]  # fmt: skip
    for c, adjusted in zip(family, holm([c.p for c in family])):
        c.p_adjusted = adjusted
    rows = [group_row(n, g) for n, g in groups.items()]
    return StudyAnalysis(
        tally(runs), sorted({r.seed for r in runs}), rows, yardstick_table(runs), spec, comparisons, budgets,
        common_budget_flops(runs), load, disagreements(comparisons, budgets[0].comparisons),
        mining_diagnostics(groups), inference_steps(runs), inference_table(groups, inference_steps(runs)),
        problems(runs), yardstick_standing(rows), len(family), flops_ratios(groups),
    )  # fmt: skip


def flops_ratios(groups: Mapping[str, Sequence[RunRecord]]) -> dict[str, float]:
    """Each group's mean training FLOPs relative to the cheapest group's (NaN where not measured)."""
    means = {name: _mean_of(final_values(runs, "train_flops")) for name, runs in groups.items()}
    cheapest = min((m for m in means.values() if m > 0), default=math.nan)
    return {name: m / cheapest for name, m in means.items()}

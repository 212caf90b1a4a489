"""Two groups differing in one factor, compared on one score: the paired or Welch test, the declared primary
comparison, and where two readings of the same question disagree."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RunRecord
from diffusion_lib.report.scores import ALPHA, Score, Scoring, finished
from diffusion_lib.report.stats import (
    Equivalence, equivalence_test, min_detectable, paired_se, paired_test, seeds_needed, verdict, welch_se, welch_test,
)

# why a comparison gives no verdict (Comparison.refused); markdown.py words them
NO_VALUES, TOO_FEW, NOT_REACHED, UNEVEN_LOAD, MIXED_PACKING = (
    "no values", "too few values", "budget not reached", "uneven load", "mixed packing")
_ABSENT = object()  # a factor a group does not set (differs from every real value)


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
    se: float = math.nan  # standard error of A − B in its test (paired: of the mean per-seed difference)
    dof: float = math.nan  # the test's degrees of freedom

    def mde(self, alpha: float = ALPHA) -> float:
        """The smallest true |A − B| this test detects four times in five at `alpha` (its spread as observed)."""
        return min_detectable(self.se, self.dof, alpha) if self.refused is None else math.nan

    def equivalence(self, margin: float) -> Equivalence:
        """Two one-sided tests that |true A − B| < margin (in the metric's units)."""
        return equivalence_test(self.diff, self.se, self.dof, margin, ALPHA)

    def seeds_needed(self, effect: float) -> int | None:
        """Seeds (pairs) a paired study with this spread of per-seed differences needs to detect `effect`."""
        return seeds_needed(self.se * math.sqrt(self.n_a), effect, ALPHA) if self.test == "paired" else None

    def margin_units(self, margin: float | str | None) -> float:
        """A declared margin in the metric's units ('2%' is 2 % of B's mean); NaN when none."""
        if margin is None:
            return math.nan
        if isinstance(margin, str):
            return abs(self.mean_b) * float(margin.rstrip("%")) / 100
        return float(margin)

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
        se, dof = paired_se(np.subtract(xa, xb))
        unpaired = [run_id for side in (va, vb) for s, (run_id, _) in side.items() if s not in shared]
    else:
        xa, xb = [v for _, v in va.values()], [v for _, v in vb.values()]
        result = welch_test(xa, xb)
        se, dof = welch_se(xa, xb)
        unpaired = []
    testable = math.isfinite(result.p_value)
    return Comparison(
        a, b, factor, score, higher, view, result.test if testable else "none", len(xa), len(xb), unpaired,
        float(np.mean(xa)) if xa else math.nan, float(np.mean(xb)) if xb else math.nan,
        result.diff, result.ci_low, result.ci_high, result.p_value,
        refused=None if testable else NO_VALUES if not xa or not xb else TOO_FEW, se=se, dof=dof,
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


@dataclass
class PrimarySpec:
    a: str
    b: str
    score: str  # <metric>_<set>
    missing: list[str]  # declared labels without runs in this study (then nothing is primary)
    unknown: list[str] | None = None  # the scores allowed, when `score` is none of them (then nothing is primary)
    margin: float | str | None = None  # equivalence margin: the metric's units, or 'N%' of B

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
    return PrimarySpec(a, b, name, [s for s in (a, b) if s not in present], unknown, primary.get("margin"))

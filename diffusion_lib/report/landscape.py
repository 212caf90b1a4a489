"""The energy landscape (eval.ranking_scales, eval.best_of; final.json "ranking_<set>", "best_of_<set>") and
test-time compute (the inference inner-steps sweep): per group over seeds, the landscape's own Holm family of
tests, error-vs-FLOPs curves, and the flat summary.csv columns of it all."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RunRecord, is_number
from diffusion_lib.report.comparisons import group_pairs
from diffusion_lib.report.scores import ALPHA, Estimate, Score, Scoring, estimate, finished, mean_of
from diffusion_lib.report.stats import holm, paired_test, verdict

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
    subsets: list[tuple[int, int]]  # (k, n) where finished runs measured it on the first k of n problems a set

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
    return Landscape(distances, levels, level, ranking, ns, best, tests, flop_curves(groups, scores, ns),
                     landscape_subsets(runs))


def landscape_subsets(runs: Sequence[RunRecord]) -> list[tuple[int, int]]:
    """(k, n) for each eval.landscape_samples k < eval.num_samples n of the finished runs: their landscape
    covers the first k of each held-out set's n problems (none: every problem)."""
    found = set()
    for run in finished(runs):
        config = run.config or {}
        k, n = config.get("eval.landscape_samples") or 0, config.get("eval.num_samples")
        if is_number(n) and 0 < k < n:
            found.add((int(k), int(n)))
    return sorted(found)


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
            sweep = [(mean_of([_number(_nested(r, "inference_steps_sweep_flops", k)) for r in done]),
                      estimate([sweep_value(r, k, name) for r in done]), k) for k in steps]  # fmt: skip
            best = [(mean_of([_number(_nested(r, f"best_of_{set_name}", n, "flops_per_answer")) for r in done]),
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

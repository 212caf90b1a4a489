"""The per-group table (scores, convergence, EMA lag, standing against the yardsticks), mining diagnostics, the
runs that did not finish, and the per-run summary (summary.csv)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_lib.harness.run_dir import RunRecord, is_number
from diffusion_lib.report.landscape import landscape_columns
from diffusion_lib.report.scores import (
    BASES, LAST_FRACTION, Estimate, Score, Scoring, estimate, final_values, finished, mean_of, scoring, sd,
)
from diffusion_lib.report.stats import interpolate_at
from diffusion_lib.report.yardsticks import BEATS, LEVEL, standing, yardstick, yardstick_names

CONFIG_COLUMNS = ("task.dataset", "task.rank", "train.steps", "train.batch_size", "train.lr", "model.hidden_dim",
                  "train.budget_flops")  # fmt: skip
RUN_COLUMNS = ("train_seconds", "steps_per_second", "train_flops", "flops_per_step", "pack_size", "energy_grad_evals")
CODE_COLUMNS = ("git_commit", "git_dirty", "git_error")  # which code made the row
DIAGNOSTICS = ("accept_rate", "energy_decrease", "move_rms")
# config.yaml keys of the EMA (ema.py): decay, update interval, warm-up start and power
EMA_KEYS = {"decay": "train.ema_decay", "every": "train.ema_every", "after": "train.ema_update_after_step",
            "power": "train.ema_power"}  # fmt: skip


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
    return Convergence(float(np.mean(drops)), sd(finals), len(drops))


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
            gap[set_name] = mean_of([sign * (e - w) for e, w in zip(ema, raw)])
            spreads = (sd(ema), sd(raw))
            spread[set_name] = max(spreads) if all(map(math.isfinite, spreads)) else math.nan
            ratio[set_name] = mean_of(ema) / mean_of(raw) if mean_of(raw) else math.nan
    return EmaLag(name, mean_of([ema_horizon(r) for r in done]), mean_of(fractions), gap, spread, ratio)


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


def group_row(name: str, runs: Sequence[RunRecord], scores: Scoring) -> GroupRow:
    values = {s.key: estimate(final_values(runs, s.key)) for s in scores.scores()}
    sticks = yardstick_names(runs)
    vs: dict[str, dict[str, dict[str, str]]] = {basis: {} for basis in BASES}
    for basis in BASES:
        for set_name in scores.sets if scores.headline else ():
            score = Score(scores.headline.metric, set_name, basis)
            vs[basis][set_name] = {
                stick: standing(values[score.key], mean_of([yardstick(r, set_name, stick, score.metric)
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
                per_run[key].append(mean_of([float(r[key]) for r in lines if is_number(r.get(key))]))
            lists = [r["accept_rate_steps"] for r in lines if isinstance(r.get("accept_rate_steps"), list)]
            if lists:
                width = Counter(len(x) for x in lists).most_common(1)[0][0]  # opt_steps of the run
                steps.append([mean_of([float(x[i]) for x in lists if len(x) == width and is_number(x[i])])
                              for i in range(width)])  # fmt: skip
        width = max((len(s) for s in steps), default=0)
        per_step = [mean_of([s[i] for s in steps if i < len(s)]) for i in range(width)]
        with_data = sum(any(math.isfinite(per_run[k][i]) for k in DIAGNOSTICS) for i in range(len(finished(runs))))
        rows.append(DiagnosticsRow(name, {k: mean_of(v) for k, v in per_run.items()}, per_step, with_data))
    return rows


# -- problems and the per-run summary --------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    run_id: str
    group: str
    seed: int
    status: str  # failed | missing | in progress | damaged
    reason: str | None  # the run's error, what is wrong with its final.json, or who trains it now
    step: int | None  # failed: the step it stopped at; otherwise the last logged step


def problems(runs: Sequence[RunRecord]) -> list[Problem]:
    """Every run that did not finish, failed first, then missing, in progress, damaged."""
    found = []
    for status in ("failed", "missing", "in progress", "damaged"):
        for run in (r for r in runs if r.status == status):
            logged = [r["step"] for r in run.metrics if is_number(r.get("step"))]
            step = run.final.get("step") if status == "failed" else max(logged, default=None)
            reason = run.final.get("error") if status == "failed" else run.damage or run.holder
            found.append(Problem(run.run_id, run.group, run.seed, status, reason, step))
    return found


@dataclass
class LostValue:
    """A finished run's score that is NaN or infinite where others of its group have a number: the group's
    mean of that score is over one seed fewer."""

    run_id: str
    group: str
    seed: int
    key: str
    value: Any


def lost_values(runs: Sequence[RunRecord], scores: Scoring) -> list[LostValue]:
    """Every such score, by run. A score no run of a group has a number for (Sudoku's board accuracy of the
    propagation-solvable puzzles on a set that has none) is undefined there, not lost."""
    found = []
    for score in scores.scores():
        for group in dict.fromkeys(r.group for r in runs):
            members = [r for r in finished(runs) if r.group == group]
            if not any(math.isfinite(r.final_number(score.key)) for r in members):
                continue
            found += [LostValue(r.run_id, group, r.seed, score.key, r.final.get(score.key)) for r in members
                      if not math.isfinite(r.final_number(score.key))]  # fmt: skip
    return found


def code_versions(runs: Sequence[RunRecord]) -> dict[str, int]:
    """How many finished runs each code made, by its commit (and whether tracked files had changed)."""
    return dict(Counter(_code_name(run.final) for run in finished(runs)))


def _code_name(final: Mapping[str, Any]) -> str:
    if final.get("git_commit"):
        return final["git_commit"][:12] + (" with uncommitted changes" if final.get("git_dirty") else "")
    return f"an unknown commit ({final['git_error']})" if final.get("git_error") else "no git checkout"


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

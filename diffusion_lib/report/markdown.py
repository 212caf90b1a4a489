"""Study report: formats an `analysis.StudyAnalysis` into files; computes no statistics itself.

`write_report(out_dir, runs, title=..., primary=...)` writes, each file atomically:
  summary.csv   one row per run (`tables.summary_rows`): labels, sweep keys, config columns, results
  summary.json  {"title", "counts", "primary", "holm_family_size", "scoring" (metrics with directions,
                sets), "lead_basis" (ema | raw), "groups", "comparisons", "budgets", "rows"}: the analysis'
                numbers unformatted; NaN is written as null
  report.md     the readable report, verdict first, linking the PNGs under plots/ (plots.py)
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffusion_lib.report.analysis import StudyAnalysis, analyse
from diffusion_lib.report.budgets import LOAD_SPREAD_LIMIT, BudgetTable
from diffusion_lib.report.comparisons import (
    MIXED_PACKING, NO_VALUES, NOT_REACHED, TOO_FEW, UNEVEN_LOAD, Comparison, DisagreementPattern,
)
from diffusion_lib.report.scores import ALPHA, BASES, LAST_FRACTION, Estimate, Score, group_runs
from diffusion_lib.report.tables import EmaLag, GroupRow, YardstickStanding, summary_columns, summary_rows
from diffusion_lib.report.yardsticks import BEATS, BEHIND, LEVEL, YardstickRow
from diffusion_lib.report.plots import YARDSTICK_WORDS, set_words, stick_words, write_plots
from diffusion_lib.harness.run_dir import RunRecord, is_number
from diffusion_lib.harness.io import atomic_write_json, atomic_write_text, make_folder

AXIS_TITLES = {"flops": ("Matched FLOPs", "training FLOPs"), "train_seconds": ("Matched wall-clock", "training seconds")}
EMA_LAG = ("Caveat: an EMA model read mid-training lags its raw model (it averages its last horizon of steps, "
           "and its decay warms up), so a read-off penalises the run that is read earlier in its own training, "
           "typically the costlier one. The raw-model columns do not lag.")


# -- number format: one format everywhere ----------------------------------------------------------------
def fmt(value: Any, signed: bool = False) -> str:
    """3 significant digits; scientific below 1e-3 and from 1e6 (FLOPs); 'n/a' if missing or not finite."""
    if not is_number(value) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    sign = "+" if signed and value > 0 else ""
    rounded = float(f"{value:.3g}")  # decide the notation after rounding: 999 960 reads 1e6, not 1000000
    if abs(rounded) < 1e-3 or abs(rounded) >= 1e6:
        mantissa, exponent = f"{rounded:.2e}".split("e")
        return f"{sign}{float(mantissa):.3g}e{int(exponent)}"
    text = f"{rounded:.{max(0, 2 - math.floor(math.log10(abs(rounded))))}f}"
    return sign + (text.rstrip("0").rstrip(".") if "." in text else text)


def pm(e: Estimate) -> str:
    """'mean ± 95 % CI half width'."""
    return "n/a" if not math.isfinite(e.mean) else f"{fmt(e.mean)} ± {fmt(e.half)}"


def percent(value: float, signed: bool = True) -> str:
    return "n/a" if not math.isfinite(value) else f"{fmt(value, signed=signed)} %"


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) or "none"


def _cell(text: Any) -> str:
    """Markdown-table-safe text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _label(a: StudyAnalysis, metric: str) -> str:
    return a.scoring.metrics[metric].label


def _score_label(a: StudyAnalysis, score: Score) -> str:
    """'MSE in-distribution, EMA'."""
    return f"{_label(a, score.metric)} {set_words(score.set)}, {BASES[score.basis]}"


def _direction(a: StudyAnalysis, metric: str) -> str:
    """'lower MSE is better' / 'higher accuracy is better'."""
    return f"{'higher' if a.scoring.higher(metric) else 'lower'} {_label(a, metric)} is better"


def _test_text(c: Comparison) -> str:
    if c.test == "paired":
        return f"paired t, {c.n_a} pairs"
    if c.test == "Welch":
        return f"Welch t, n = {c.n_a} / {c.n_b}"
    if c.test == "sign-flip":  # differences without spread: t is undefined
        return f"exact sign-flip test, {c.n_a} pairs without spread"
    if c.test == "permutation":
        return f"exact permutation test, n = {c.n_a} / {c.n_b} without spread"
    return f"none (n = {c.n_a} / {c.n_b})"


def _reason(code: str, a: StudyAnalysis, c: Comparison | None = None) -> str:
    """Why there is no verdict (an analysis refusal code), in words; NOT_REACHED names `c`'s short groups."""
    if code == NOT_REACHED:
        table = next(t for t in a.budgets if t.axis == c.view)
        short = [f"{r.reached}/{r.finished} runs of {r.group}" for r in table.rows
                 if r.group in (c.a, c.b) and r.reached < r.finished]  # fmt: skip
        return f"only {' and '.join(short)} reached the budget"
    return {
        NO_VALUES: "no values",
        TOO_FEW: "needs ≥ 2 seeds shared by both groups or ≥ 2 values per group",
        UNEVEN_LOAD: f"the machine load varied by {fmt(a.load.spread)} (> {LOAD_SPREAD_LIMIT})",
        MIXED_PACKING: "groups were trained with different pack sizes",
    }[code]


def _ci(c: Comparison) -> str:
    """'[low, high]', or 'n/a' where no t interval exists (no test, or values without spread)."""
    return "n/a" if math.isnan(c.ci_low) or math.isnan(c.ci_high) else f"[{fmt(c.ci_low)}, {fmt(c.ci_high)}]"


def _result_text(c: Comparison, a: StudyAnalysis) -> str:
    """'worse: A − B = +0.00073 (+7.5 % of random), 95 % CI [...], p = ..., paired t, 3 pairs'."""
    if c.refused:
        return f"no verdict ({_reason(c.refused, a, c)}); A − B = {fmt(c.diff, signed=True)}"
    p = f"p = {fmt(c.p)}" + ("" if c.primary else f", Holm-adjusted p = {fmt(c.p_adjusted)}")
    return (f"**{c.verdict}**: A − B = {fmt(c.diff, signed=True)} ({percent(c.effect_pct)} of {c.b}), "
            f"95 % CI {_ci(c)}, {p}, {_test_text(c)}")


# -- report.md sections ----------------------------------------------------------------------------------
def _header(title: str, description: str, a: StudyAnalysis) -> list[str]:
    lines = [f"# {title}", ""]
    if description:
        lines += [description.strip(), ""]
    tally = ", ".join(f"{n} {status}" for status, n in a.tally.items())
    lost = (f" {len(a.lost)} non-finite score(s) of finished runs are left out of their groups' means: "
            "see Failed, missing and damaged runs." if a.lost else "")
    lines += [f"**Runs:** {sum(a.tally.values())} ({tally}).{lost}", ""]
    if len(a.code) > 1 or any(word in code for code in a.code for word in ("uncommitted", "unknown")):
        lines += ["**Code:** the finished runs were not all made by one committed version of the code: "
                  + "; ".join(f"{n} by {code}" for code, n in a.code.items())
                  + ". A difference between groups may come from the code.", ""]
    return lines


def _primary_paragraph(a: StudyAnalysis) -> list[str]:
    spec = a.primary
    if spec is None:
        return ["**No primary comparison declared** (study.yaml `primary`): every test in this report is one "
                f"Holm–Bonferroni family ({a.family_size} tests).", ""]  # fmt: skip
    if spec.missing:
        return [f"**Primary comparison {spec.a} vs {spec.b} ({spec.score}) not available:** the study has no "
                f"runs of {', '.join(spec.missing)}. Every test below is one Holm–Bonferroni family "
                f"({a.family_size} tests).", ""]  # fmt: skip
    if spec.unknown is not None:
        return [f"**Primary comparison {spec.a} vs {spec.b} not available:** its metric {spec.score!r} is not one "
                f"of this study's scores ({', '.join(spec.unknown)}). Every test below is one Holm–Bonferroni "
                f"family ({a.family_size} tests).", ""]  # fmt: skip
    found = a.primary_comparisons
    if not found:
        return [f"**Primary comparison {spec.a} vs {spec.b}:** no two groups of these strategies differ only in "
                "the strategy, so it cannot be tested.", ""]  # fmt: skip
    head = found[0].score
    higher = a.scoring.higher(head.metric)
    lines = [f"**Primary comparison** (declared in study.yaml; tested alone, not corrected for multiple tests): "
             f"{spec.a} vs {spec.b}, {_label(a, head.metric)} {set_words(head.set)} at the end of training; "
             f"{_direction(a, head.metric)}, so A − B {'>' if higher else '<'} 0 means {spec.a} is better.", ""]
    for ema in (c for c in found if c.score.basis == "ema"):
        raw = next(c for c in found if (c.a, c.b, c.score) == (ema.a, ema.b, ema.score.on("raw")))
        where = f" ({ema.a} vs {ema.b})" if len(found) > 2 else ""
        lagging = [lag for lag in a.lagging if lag.group in (ema.a, ema.b)]
        if lagging:
            lines.append(f"- **The EMA view describes lag, not a model{where}** ({'; '.join(map(_lag_text, lagging))}): "
                         "the raw model's verdict leads.")  # fmt: skip
        elif any((d.a, d.b, d.metric, d.set, d.kind) == (ema.a, ema.b, ema.score.metric, ema.score.set, "model")
                 for d in a.disagreements):  # fmt: skip
            lines.append(f"- **EMA and raw disagree{where}**: EMA says {ema.verdict}, raw says {raw.verdict}; "
                         "the verdict depends on which model is scored.")  # fmt: skip
        views = [("raw", raw), ("EMA", ema)] if lagging else [("EMA", ema), ("raw", raw)]
        lines += [f"- {name}{where}: {_result_text(c, a)}. {_sentence(_reach_text(c, a, spec.margin))}"
                  for name, c in views]
        if math.isfinite(ema.equal_flops):
            lines.append(f"- Equal compute: every finished run of both groups trained to the same budget of "
                         f"{fmt(ema.equal_flops)} FLOPs.")  # fmt: skip
    return lines + [""]


def _pct_of_b(c: Comparison, value: float) -> str:
    return percent(100 * value / abs(c.mean_b), signed=False) if c.mean_b else "n/a"


def _ruled_out(c: Comparison) -> str:
    """What the 95 % CI leaves possible, as the largest gain and loss of A over B in % of B."""
    if math.isnan(c.ci_low) or math.isnan(c.ci_high):
        return "no interval, so nothing is ruled out"
    gain, loss = (c.ci_high, -c.ci_low) if c.higher_is_better else (-c.ci_low, c.ci_high)
    if gain <= 0:
        return f"the 95 % CI rules out any gain of {c.a} (its loss lies within {_pct_of_b(c, -gain)}–{_pct_of_b(c, loss)})"
    if loss <= 0:
        return f"the 95 % CI rules out any loss of {c.a} (its gain lies within {_pct_of_b(c, -loss)}–{_pct_of_b(c, gain)})"
    return f"the 95 % CI rules out a gain of {c.a} above {_pct_of_b(c, gain)} and a loss above {_pct_of_b(c, loss)}"


def _mde_text(c: Comparison, alpha: float) -> str:
    mde = c.mde(alpha)
    return "" if math.isnan(mde) else f"{fmt(mde)} ({_pct_of_b(c, mde)})"


def _sentence(text: str) -> str:
    """`text` with its first letter capitalised (it follows a full stop)."""
    return text[:1].upper() + text[1:]


def _reach_text(c: Comparison, a: StudyAnalysis, margin: float | str | None) -> str:
    """What the primary's view can tell: ruled out, detectable, equivalence (with a margin), seeds needed."""
    if c.refused:
        return ""
    parts = [_ruled_out(c)]
    if mde := _mde_text(c, ALPHA):
        parts.append(f"detectable at 80 % power: |A − B| ≥ {mde}")
    target, words = abs(c.diff), "the observed effect"
    if margin is not None:
        units = c.margin_units(margin)
        eq = c.equivalence(units)
        shown = "equivalent" if eq.equivalent else "not shown equivalent"
        parts.append(f"{shown} within ±{margin} ({fmt(units)}; two one-sided tests, p = {fmt(eq.p_value)})")
        target, words = units, f"a difference of {margin}"
    needed = c.seeds_needed(target)
    if needed is not None:
        parts.append(f"seeds needed to detect {words} at 80 % power: {needed} (this study: {c.n_a})")
    return "; ".join(parts) + "."


# -- the answer on one screen ----------------------------------------------------------------------------
def _answer_section(a: StudyAnalysis) -> list[str]:
    """The question and its answer first: per primary view the verdict, effect, interval and what it rules
    out, the compute ratio, and any disagreement, in one line each."""
    spec, found = a.primary, a.primary_comparisons
    lines = ["## The answer", ""]
    if spec is None or not found:
        return lines + ["No primary comparison was tested (see the Verdict); the comparisons below answer one "
                        "Holm–Bonferroni family.", ""]
    head = found[0].score
    lines.append(f"**Question:** is {spec.a} better than {spec.b} on {_label(a, head.metric)} "
                 f"{set_words(head.set)}? ({_direction(a, head.metric)}; seeds {_seeds(a.seeds)})")
    for c in sorted(found, key=lambda c: c.score.basis != a.lead_basis):
        view = BASES[c.score.basis]
        if c.refused:
            lines.append(f"- {view}: no verdict ({_reason(c.refused, a, c)}).")
            continue
        lines.append(f"- {view}: **{c.verdict}**, A − B = {fmt(c.diff, signed=True)} ({percent(c.effect_pct)} of "
                     f"{c.b}), 95 % CI {_ci(c)}, p = {fmt(c.p)}; {_reach_text(c, a, spec.margin)}")
    ratio = a.flops_ratio.get(found[0].a, math.nan) / a.flops_ratio.get(found[0].b, math.nan)
    if math.isfinite(ratio):
        lines.append(f"- Compute: {found[0].a} used {fmt(ratio)}× the training FLOPs of {found[0].b} "
                     f"({'equal FLOPs' if math.isfinite(a.equal_flops) else 'equal steps'}).")
    pairs = {(c.a, c.b) for c in found}
    split = [d for d in a.disagreements if (d.a, d.b) in pairs and d.metric == head.metric and d.set == head.set]
    said = dict.fromkeys(f"EMA says {d.first}, raw says {d.second}" if d.kind == "model" else
                         f"{BASES[d.basis]} at equal steps says {d.first}, at equal FLOPs {d.second}" for d in split)
    lines.append("- Disagreements: " + ("; ".join(said) if said else
                                        "none between EMA and raw, or equal steps and equal FLOPs, on this score") + ".")
    return lines + [""]


def _contents(sections: Sequence[Sequence[str]]) -> list[str]:
    """A table of contents: one link per '## ' title (GitHub's anchors: lower case, spaces to hyphens)."""
    titles = [line[3:] for section in sections for line in section if line.startswith("## ")]
    anchor = lambda t: re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-")  # noqa: E731
    return ["**Contents:** " + " · ".join(f"[{t}](#{anchor(t)})" for t in titles), ""]


def _lag_text(lag: EmaLag) -> str:
    """'adversarial: EMA horizon ~934 steps = 93 % of training; EMA 2.2× raw on in-distribution, beyond the
    seed spread'."""
    parts = []
    if lag.long_horizon:
        parts.append(f"EMA horizon ~{fmt(lag.horizon)} steps = {fmt(100 * lag.fraction)} % of training")
    if lag.far_sets:
        ratios = ", ".join(f"{fmt(lag.ratio[s])}× raw on {set_words(s)}" for s in lag.far_sets)
        parts.append(f"EMA {ratios}, worse beyond the seed spread")
    return f"{lag.group}: {'; '.join(parts)}"


def _lag_sentence(a: StudyAnalysis) -> str:
    rule = (f"(rule: the EMA horizon, update interval / (1 − decay at the end), exceeds {fmt(100 * LAST_FRACTION)} % "
            "of training, or the EMA's headline score is worse than the raw model's by more than their seed spread)")
    if not a.lagging:
        return f"**EMA:** no group's EMA view describes lag {rule}; the EMA view leads."
    return (f"**EMA lag** {rule}: {'; '.join(map(_lag_text, a.lagging))}. These EMA verdicts measure how far the "
            "average trails the model, not the model: the raw view leads this report.")


def _pattern_pairs(a: StudyAnalysis, pattern: DisagreementPattern) -> str:
    """'adversarial vs random (MSE in-distribution, ood), random vs none (MSE ood, raw)'."""
    texts = []
    for (first, second), cases in pattern.pairs().items():
        sets: dict[str, dict[str, None]] = {}
        for d in cases:
            sets.setdefault(d.metric, {})[set_words(d.set)] = None
        where = "; ".join(f"{_label(a, metric)} {', '.join(names)}" for metric, names in sets.items())
        if pattern.kind == "compute":
            where += "; " + " and ".join(dict.fromkeys(BASES[d.basis] for d in cases))
        texts.append(f"{first} vs {second} ({where})")
    return ", ".join(texts)


def _disagreement_paragraph(a: StudyAnalysis) -> list[str]:
    if not a.disagreements:
        return ["**No disagreements:** EMA and raw verdicts agree for every comparison, and so do the verdicts at "
                "equal steps and at equal FLOPs (where both exist).", ""]  # fmt: skip
    lines = [f"**Readings disagree** ({len(a.disagreements)} comparisons, {len(a.patterns)} patterns; the same "
             "question gets different verdicts):"]  # fmt: skip
    for p in a.patterns:
        first, second = ("EMA", "raw") if p.kind == "model" else ("equal steps", "equal FLOPs")
        note = " (the EMA describes lag: see above)" if p.kind == "model" and a.lagging else ""
        lines.append(f"- {first} {p.first}, {second} {p.second}{note} — {len(p.cases)}: {_pattern_pairs(a, p)}.")
    return lines + [""]


def _compute_sentence(a: StudyAnalysis) -> str:
    if math.isfinite(a.equal_flops):
        return (f"**Compute:** every finished run trained to the same FLOP budget ({fmt(a.equal_flops)} FLOPs), so "
                "the comparisons at the end of training are equal-compute comparisons.")
    ratios = [f"{g} {fmt(r)}×" for g, r in a.flops_ratio.items() if math.isfinite(r)]
    measured = f" Measured training FLOPs relative to the cheapest group: {', '.join(ratios)}." if len(ratios) > 1 else ""
    return ("**Compute:** runs trained for a number of steps, not to a FLOP budget, so the comparisons at the end "
            f"of training are at equal steps, not equal compute.{measured}")


def _headline_words(a: StudyAnalysis) -> str:
    head = a.scoring.headline
    return f"EMA {set_words(head.set)} validation {_label(a, head.metric)}" if head else "headline score"


def _convergence_sentence(a: StudyAnalysis) -> str:
    rule = (f"(rule: the mean over seeds of the improvement of the {_headline_words(a)} over the last fifth of "
            "training exceeds the standard deviation across seeds of its final value)")
    late = [g.group for g in a.groups if g.convergence.status == "not converged"]
    unknown = [g.group for g in a.groups if g.convergence.status == "n/a"]
    if len(unknown) == len(a.groups):
        return f"**Convergence not assessable:** no group has two seeds with a validation curve {rule}."
    if late:
        text = f"**Not converged** {rule}: {', '.join(late)}."
    else:
        text = f"**Every assessable group converged** {rule}."
    return text + (f" Not assessable (fewer than two seeds with a curve): {', '.join(unknown)}." if unknown else "")


def _standing_text(st: YardstickStanding, sticks: str, groups: int) -> str:
    """'every group beats the zeros predictor and the linear map' (sticks: the yardsticks alike)."""
    if len(st.beaten_by) == len(st.rated):
        who = f"every group beats {sticks}"
    elif not st.beaten_by and not st.level_with:
        who = f"no group beats {sticks}"
    elif not st.beaten_by:
        who = f"no group beats {sticks} ({', '.join(st.level_with)} level with {'them' if ' and ' in sticks else 'it'})"
    else:
        who = f"{len(st.beaten_by)} of {len(st.rated)} groups ({', '.join(st.beaten_by)}) beat {sticks}"
        behind = [g for g in st.rated if g not in st.beaten_by and g not in st.level_with]
        if st.level_with:  # then "the rest" would not say which groups are behind
            who += f", {', '.join(st.level_with)} level with" + (f", {', '.join(behind)} behind" if behind else "")
    return who + (f" (rated: {len(st.rated)} of {groups} groups)" if len(st.rated) < groups else "")


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _yardstick_sentence(a: StudyAnalysis) -> str:
    head = a.scoring.headline
    if head is None or not a.standing:
        return "**Yardsticks:** none recorded."
    parts = []
    for set_name in a.scoring.sets:
        alike: dict[tuple, list[YardstickStanding]] = {}  # yardsticks with the same standing read as one
        for st in (st for st in a.standing if st.set == set_name):
            alike.setdefault((tuple(st.rated), tuple(st.beaten_by), tuple(st.level_with)), []).append(st)
        texts = [_standing_text(sts[0], _and([f"the {stick_words(st.name)}" for st in sts]), len(a.groups))
                 for sts in alike.values()]  # fmt: skip
        if texts:
            parts.append(f"{set_words(set_name)}: {'; '.join(texts)}.")
    return (f"**Yardsticks** (final {BASES[a.lead_basis]} {_label(a, head.metric)} against each group's own "
            f"yardsticks; level with: inside the group's 95 % CI). {' '.join(parts)}")


def _verdict_section(a: StudyAnalysis) -> list[str]:
    if not a.tally.get("finished"):  # then every sentence below would be vacuously true ("no disagreements")
        tally = ", ".join(f"{n} {status}" for status, n in a.tally.items() if n)
        return ["## Verdict", "", f"**No run finished** ({tally or 'no runs'}): there is nothing to compare; "
                "see Problems for what happened to each run.", ""]
    directions = "; ".join(_direction(a, m) for m in a.scoring.metrics) or "no scores recorded"
    return [
        "## Verdict", "",
        *_primary_paragraph(a), _lag_sentence(a), "", *_disagreement_paragraph(a),
        _compute_sentence(a) + " Read-offs at matched FLOPs and wall-clock: see the equal-compute view.", "",
        _convergence_sentence(a), "", _yardstick_sentence(a), "",
        f"Verdicts: better / worse / no detectable difference at α = {ALPHA}, for A against B ({directions}); "
        "'no detectable difference' with few seeds is not evidence that the groups are equal. Tests "
        f"other than the primary form one Holm–Bonferroni family of {a.family_size} tests, and their verdicts use "
        "the adjusted p.", "",
    ]  # fmt: skip


def _yardsticks_section(a: StudyAnalysis) -> list[str]:
    lines = ["## Yardsticks", "",
             "What a score means: the held-out score of simple predictors on the same problems, mean over the "
             "finished runs (n: runs that recorded it). n/a: not recorded.", ""]  # fmt: skip
    if not a.yardstick_points:
        return lines + [line for set_name, rows in a.yardsticks.items()
                        for line in _yardstick_table(a, set_words(set_name), rows)]  # fmt: skip
    lines += ["The study sweeps the task, which changes the held-out problems: one table per swept value.", ""]
    for point, table in a.yardstick_points.items():
        lines += [line for set_name, rows in table.items()
                  for line in _yardstick_table(a, f"{set_words(set_name)}, {point}", rows)]  # fmt: skip
    return lines


def _yardstick_table(a: StudyAnalysis, title: str, rows: Sequence[YardstickRow]) -> list[str]:
    by_name: dict[str, list[YardstickRow]] = {}
    for y in rows:
        by_name.setdefault(y.name, []).append(y)
    table = [[stick_words(name), YARDSTICK_WORDS.get(name, (name, ""))[1], *(fmt(y.mean) for y in ys),
              max(y.n for y in ys), "; ".join(f"{_label(a, y.metric)} varies across runs: {fmt(y.low)} to "
                                              f"{fmt(y.high)}" for y in ys if y.varies)]
             for name, ys in by_name.items()]  # fmt: skip
    header = ["yardstick", "what it is", *(_label(a, m) for m in a.scoring.metrics), "n runs", "note"]
    return [f"**{title}**", "", *(_table(header, table) if table else ["none recorded", ""])]


def _standing_cell(g: GroupRow, basis: str, set_name: str) -> str:
    """'beats: zeros predictor, linear map; behind: clamp floor'."""
    marks = g.vs_yardstick[basis].get(set_name, {})
    words = {mark: [stick_words(n) for n, m in marks.items() if m == mark] for mark in (BEATS, LEVEL, BEHIND)}
    return "; ".join(f"{mark}: {', '.join(names)}" for mark, names in words.items() if names) or "n/a"


def _lag_cell(lag: EmaLag) -> str:
    if not math.isfinite(lag.fraction) and not lag.far_sets:
        return "n/a"
    horizon = f"horizon {fmt(100 * lag.fraction)} % of training" if math.isfinite(lag.fraction) else "horizon n/a"
    far = f"; worse than raw beyond the seed spread on {', '.join(map(set_words, lag.far_sets))}" if lag.far_sets else ""
    return f"{'**lag**' if lag.lagging else 'no'} ({horizon}{far})"


def _groups_section(a: StudyAnalysis) -> list[str]:
    scores, sets, lead = a.scoring.scores(), a.scoring.sets, a.lead_basis
    rows = [[g.group, f"{g.finished}/{g.runs}", _seeds(g.seeds), pm(g.steps), pm(g.train_flops),
             *(pm(g.values[s.key]) for s in scores), *(_standing_cell(g, lead, s) for s in sets),
             _lag_cell(g.lag), g.convergence.status] for g in a.groups]  # fmt: skip
    head = a.scoring.headline
    header = ["group", "n finished/runs", "seeds", "steps", "training FLOPs", *(_score_label(a, s) for s in scores),
              *(f"{BASES[lead]} {set_words(s)} vs yardsticks" for s in sets), "EMA lag", "convergence"]  # fmt: skip
    return [
        "## Final results per group", "",
        "Final held-out scores at each run's last step, of the EMA model and of the raw (non-EMA) model, on each "
        f"held-out set: mean ± 95 % Student-t half width over the finished seeds (seeds column; '± n/a': one "
        "seed). Compute per group: steps and training FLOPs (mean ± half width; n/a: not measured). 'vs "
        f"yardsticks': the group's mean {BASES[lead]} {_label(a, head.metric) if head else 'score'} against the "
        "yardsticks of its runs. EMA lag and convergence: see the rules in the verdict.", "",
        *_table(header, rows),
    ]  # fmt: skip


def _comparison_rows(comparisons: Sequence[Comparison], a: StudyAnalysis) -> list[list[str]]:
    return [[
        f"{c.a} vs {c.b}" + (" (primary)" if c.primary else ""), c.factor, _score_label(a, c.score), _test_text(c),
        fmt(c.mean_a), fmt(c.mean_b), fmt(c.diff, signed=True), percent(c.effect_pct),
        _ci(c), _mde_text(c, ALPHA if c.primary else ALPHA / max(a.family_size, 1)) or "n/a",
        fmt(c.p), "uncorrected" if c.primary else fmt(c.p_adjusted),
        c.verdict if c.refused is None else f"no verdict: {_reason(c.refused, a, c)}",
    ] for c in comparisons]  # fmt: skip


COMPARISON_HEADER = ["A vs B", "differ in", "score", "test", "mean A", "mean B", "A − B", "% of B", "95 % CI",
                     "MDE (80 %)", "p", "Holm p", "verdict"]  # fmt: skip


def _unpaired_notes(comparisons: Sequence[Comparison], a: StudyAnalysis) -> list[str]:
    notes = dict.fromkeys(f"- {c.a} vs {c.b}, {_score_label(a, c.score)}: left out of the paired test (no partner "
                          f"with a value): {', '.join(c.unpaired)}" for c in comparisons if c.unpaired)  # fmt: skip
    return [*notes, ""] if notes else []


def _lead_first(comparisons: Sequence[Comparison], a: StudyAnalysis) -> list[Comparison]:
    """Primary first, then the leading view's comparisons before the other's (stable otherwise)."""
    return sorted(comparisons, key=lambda c: (not c.primary, c.score.basis != a.lead_basis))


def _comparisons_section(a: StudyAnalysis) -> list[str]:
    lines = [
        "## Comparisons at the end of training", "",
        "Groups that differ in exactly one factor, as 'A vs B', on every final score of the EMA and of the raw "
        f"model, at each run's last step (compute: see the group table; seeds {_seeds(a.seeds)}). "
        "Runs of the two groups with the same seed share initial weights, batches and noise, so the test is "
        "paired on the per-seed differences A − B when at least two seeds are shared by finished runs of both; "
        "otherwise Welch's unequal-variance test on every value. Where the values have no spread (two seeds "
        "can tie on an accuracy) t is undefined and an exact sign-flip or permutation test gives p, with no CI. "
        "A − B and its 95 % CI are for that test (paired: "
        "the mean per-seed difference); '% of B' is A − B relative to B's mean; whether a positive A − B is "
        "better follows the metric's direction. The primary comparison comes first and is not corrected; every "
        f"other p is Holm-adjusted over the whole report's family. The {BASES[a.lead_basis]} view is listed first. "
        "MDE: the minimum detectable effect, the smallest true |A − B| the test used detects with 80 % power given "
        f"the observed spread (in the metric's units and % of B), at α = {ALPHA} for the primary and, for the rest, "
        f"at α / {max(a.family_size, 1)} (Holm's strictest step over the family of {a.family_size} tests).",
        "",
    ]  # fmt: skip
    if not a.comparisons:
        return lines + ["No two groups differ in exactly one factor.", ""]
    ordered = _lead_first(a.comparisons, a)
    return lines + _table(COMPARISON_HEADER, _comparison_rows(ordered, a)) + _unpaired_notes(ordered, a)


def _budget_subsection(letter: str, table: BudgetTable, a: StudyAnalysis) -> list[str]:
    title, unit = AXIS_TITLES[table.axis]
    lines = [f"### ({letter}) {title}: budget {fmt(table.budget)} {unit}", ""]
    if not math.isfinite(table.budget):
        return lines + [f"n/a: no finished run logged {unit} on its validation lines.", ""]
    lines += [
        f"Validation scores (EMA and raw, every held-out set) read off each finished run's validation curve at "
        f"{fmt(table.budget)} {unit}: the smallest last validation point of any finished run, read log-linearly "
        f"between the bracketing validation points, never extrapolated. Seeds {_seeds(a.seeds)}; 'reached': "
        "finished runs whose curve covers the budget; means ± 95 % CI over those. " + EMA_LAG, "",
    ]  # fmt: skip
    if table.refused:
        lines += [f"**No verdicts on this axis:** {_reason(table.refused, a)} (see machine load below).", ""]
    scores = a.scoring.scores()
    rows = [[r.group, pm(r.own_final), f"{r.reached}/{r.finished}", *(pm(r.values[s.key]) for s in scores)]
            for r in table.rows]  # fmt: skip
    header = ["group", f"group's own final {unit}", "reached", *(_score_label(a, s) for s in scores)]
    lines += _table(header, rows)
    short = [r for r in table.rows if r.reached < r.finished]
    if short:
        lines += ["Not every run reached the budget (" + ", ".join(f"{r.group}: {r.reached}/{r.finished}" for r in short)
                  + "): comparisons involving these groups give no verdict.", ""]  # fmt: skip
    else:
        lines += ["Every finished run reached the budget.", ""]
    if table.comparisons:
        ordered = _lead_first(table.comparisons, a)
        lines += _table(COMPARISON_HEADER, _comparison_rows(ordered, a)) + _unpaired_notes(ordered, a)
    return lines


def _load_subsection(a: StudyAnalysis) -> list[str]:
    load = a.load
    lines = [
        "### Machine load and packing", "",
        "The 1-minute load average when each training line was written, over the finished runs' training lines. "
        f"Rule: wall-clock comparisons are flagged, and give no verdict, when the load over all these lines spans "
        f"more than {LOAD_SPREAD_LIMIT} (max − min), or when groups were trained with different pack sizes (runs "
        "packed in one process share its time: a packed run's training seconds are its share). n/a: not logged.", "",
    ]  # fmt: skip
    rows = [[r.group, fmt(r.mean), f"{fmt(r.low)} to {fmt(r.high)}" if r.lines else "n/a", r.lines,
             ", ".join(map(str, r.pack_sizes)) or "n/a"] for r in load.rows]  # fmt: skip
    lines += _table(["group", "mean load", "load range", "training lines", "pack size"], rows)
    if not any(r.lines for r in load.rows):
        lines += ["The load was not logged: the wall-clock view cannot be checked for uneven load.", ""]
    if load.load_warning:
        lines += [f"**Warning:** the load varied by {fmt(load.spread)} (> {LOAD_SPREAD_LIMIT}) during training: "
                  "training seconds are not comparable across groups.", ""]  # fmt: skip
    if load.pack_warning:
        lines += ["**Warning:** groups were trained with different pack sizes: training seconds are not comparable "
                  "across groups.", ""]  # fmt: skip
    return lines


def _equal_compute_section(a: StudyAnalysis) -> list[str]:
    rows = [[g.group, pm(g.train_flops), fmt(a.flops_ratio[g.group]), pm(g.train_seconds), pm(g.steps_per_second)]
            for g in a.groups]  # fmt: skip
    lines = [
        "## Equal-compute view", "",
        _compute_sentence(a), "",
        "Compute per group at the end of training (mean ± 95 % CI over finished seeds): measured training FLOPs "
        "(all processes together), FLOPs relative to the cheapest group, training seconds, steps per second.", "",
        *_table(["group", "training FLOPs", "FLOPs vs cheapest", "training seconds", "steps/s"], rows),
    ]  # fmt: skip
    for letter, table in zip("ab", a.budgets):
        lines += _budget_subsection(letter, table, a)
    return lines + _load_subsection(a)


def _diagnostics_section(a: StudyAnalysis) -> list[str]:
    rows = [[d.group, d.n, fmt(d.values["accept_rate"]),
             ", ".join(fmt(v) for v in d.accept_rate_steps) or "n/a",
             fmt(d.values["energy_decrease"]), fmt(d.values["move_rms"])] for d in a.diagnostics]  # fmt: skip
    return [
        "## Mining diagnostics", "",
        "Training lines of the last fifth of each finished run's training, averaged per run, then over the n "
        "seeds with data: the accept rate of the mining descent (mean, and per inner step 1, 2, ...), the energy "
        "decrease E(start) − E(negative) mining achieved, and the RMS distance the negatives moved. n/a: not "
        "logged (a strategy that does not mine by descent).", "",
        *_table(["group", "n", "accept rate", "accept rate per inner step", "energy decrease", "RMS moved"], rows),
    ]  # fmt: skip


def _test_time_section(a: StudyAnalysis) -> list[str]:
    lines = ["## Test-time compute", ""]
    if not a.inference_steps:
        return lines + ["No run has an inference-steps sweep (eval.inference_steps_sweep was empty).", ""]
    lines += [
        "Held-out scores of the final EMA model (at each run's last step; steps and FLOPs in the group table) when "
        "sampling with a given number of inner optimisation steps per diffusion timestep: mean ± 95 % CI over "
        f"the finished seeds (seeds {_seeds(a.seeds)}; per group, see the group table).", "",
    ]  # fmt: skip
    header = ["group", *(f"{s} inner step{'' if s == '1' else 's'}" for s in a.inference_steps)]
    for score in (s for s in a.scoring.scores() if s.basis == "ema"):
        rows = [[group, *(pm(cells[score.name][s]) for s in a.inference_steps)] for group, cells in a.inference.items()]
        lines += [f"**{_label(a, score.metric)} {set_words(score.set)}, EMA**", "", *_table(header, rows)]
    return lines


def _landscape_section(a: StudyAnalysis) -> list[str]:
    land = a.landscape
    lines = ["## The energy landscape", ""]
    if not land.present:
        return lines + ["No run measured its energy landscape (eval.ranking_scales and eval.best_of were empty).", ""]
    tested = [t for t in land.tests if math.isfinite(t.p_adjusted)]
    lines += [
        "Where the strategies differ by construction: how the energy, which sampling descends, treats the true "
        "answer. Each test is paired over seeds (a seed's ranking accuracy against chance, 0.5, and against "
        "the same seed of an arm differing in one factor; a seed's "
        "energy pick against its random pick among the same N samples) and Holm-adjusted within a family of "
        f"its own ({len(tested)} tests), apart from the comparisons of groups above.", "",
    ]  # fmt: skip
    if land.subsets:
        shares = " or ".join(f"the first {k} of the {n}" for k, n in land.subsets)
        lines += [f"Measured on {shares} problems of each held-out set (eval.landscape_samples); the other "
                  "sections score every problem.", ""]
    if land.distances:
        lines += _ranking_subsection(a)
    if land.best_of_ns:
        lines += _best_of_subsection(a)
    return lines


def _landscape_verdicts(a: StudyAnalysis, kind: str, group: str, basis: str) -> str:
    """'better at sigma_0.1 (id, ood), worse at samples (ood); no detectable difference elsewhere'."""
    found: dict[str, dict[str, list[str]]] = {}
    for t in a.landscape.tests:
        if t.kind == kind and t.group == group and t.basis == basis and t.verdict in ("better", "worse"):
            item = f"N = {t.item}" if kind == "best_of" else t.item
            found.setdefault(t.verdict, {}).setdefault(item, []).append(set_words(t.set))
    parts = [f"{word} at " + ", ".join(f"{item} ({', '.join(sets)})" for item, sets in items.items())
             for word, items in found.items()]  # fmt: skip
    return "; ".join(parts) + ("; no detectable difference elsewhere" if parts else "no detectable difference")


def _ranking_subsection(a: StudyAnalysis) -> list[str]:
    land = a.landscape
    levels = land.ranking_levels
    where = (f"at each diffusion level ranked (0: where the last inner steps descend; the tests read level "
             f"{land.ranking_level})" if len(levels) > 1 else f"at diffusion level {land.ranking_level}")
    lines = [
        f"**Energy as a verifier.** The fraction of pairs (true answer, other answer) whose energy {where} puts "
        "the true answer lower (ties count half): 1 is a perfect verifier, 0.5 a blind one. The other answer is "
        "the true one plus sigma times Gaussian noise (sigma_<s>), or the model's own sample (samples). Mean ± "
        "95 % CI over the finished seeds.", "",
    ]  # fmt: skip
    by_level = ["level"] if len(levels) > 1 else []
    for set_name in a.scoring.sets:
        for basis in BASES:
            rows = [[g, *([lv] if by_level else []), *(pm(cells[set_name][basis][lv][d]) for d in land.distances)]
                    for g, cells in land.ranking.items() if set_name in cells for lv in levels]  # fmt: skip
            lines += [f"*{set_words(set_name)}, {BASES[basis]}*", "",
                      *_table(["group", *by_level, *land.distances], rows)]  # fmt: skip
    for group in land.ranking:
        words = "; ".join(f"{BASES[b]}: {_landscape_verdicts(a, 'ranking', group, b)}" for b in BASES)
        lines.append(f"- {group}, ranking accuracy against chance (0.5): {words}.")
    for pair in dict.fromkeys(t.group for t in land.tests if t.kind == "ranking_pair"):
        words = "; ".join(f"{BASES[b]}: {_landscape_verdicts(a, 'ranking_pair', pair, b)}" for b in BASES)
        lines.append(f"- {pair}, ranking accuracy (A better: A ranks true answers better): {words}.")
    return lines + [""]


def _best_of_subsection(a: StudyAnalysis) -> list[str]:
    land = a.landscape
    metric = next(iter(a.scoring.metrics))
    lines = [
        f"**Best-of-N.** N answers per problem from N start noises (the first is the set's own), and the "
        f"{_label(a, metric)} of the lowest-energy one (energy), of a random one (random: the mean over the N) "
        f"and of the best one (oracle); {_direction(a, metric)}. Gain: how much better the energy pick is than "
        "the random pick, in % of the random pick's value (negative: worse). Room: the same for the oracle: all "
        "that selection among these N samples can gain (near 0 % when the samples agree). FLOPs per answer count "
        "the N samples and their scoring. Mean over the finished seeds.", "",
    ]  # fmt: skip
    header = ["group", "N", "energy pick", "random pick", "oracle", "gain (energy vs random)",
              "room (oracle vs random)", "FLOPs per answer"]
    for set_name in a.scoring.sets:
        for basis in BASES:
            rows = []
            for group, cells in land.best_of.items():
                for n, picks in cells.get(set_name, {}).get(basis, {}).items():
                    flops = next((p[0] for c in land.curves if c.group == group and c.set == set_name
                                  and c.kind == "best-of-N" for p in c.points if p[2] == f"N={n}"), math.nan)  # fmt: skip
                    rows.append([group, n, pm(picks["energy"]), pm(picks["random"]), pm(picks["oracle"]),
                                 percent(picks["gain"].mean), percent(picks["room"].mean, signed=False), fmt(flops)])
            lines += [f"*{_label(a, metric)} {set_words(set_name)}, {BASES[basis]}*", "", *_table(header, rows)]
    for group in land.best_of:
        words = "; ".join(f"{BASES[b]}: {_landscape_verdicts(a, 'best_of', group, b)}" for b in BASES)
        lines.append(f"- {group}, energy pick against a random pick: {words}.")
    return lines + ["", "The plot error_vs_answer_flops.png sets best-of-N against more inner steps at equal "
                    "FLOPs per answer.", ""]


def _problems_section(a: StudyAnalysis) -> list[str]:
    lines = ["## Failed, missing and damaged runs", ""]
    if not a.problems and not a.lost:
        return lines + ["None: every run finished.", ""]
    for p in a.problems:
        where = f"`{p.run_id}` ({p.group}, seed {p.seed})"
        if p.status == "failed":
            lines.append(f"- failed: {where} at step {p.step if p.step is not None else 'n/a'}: "
                         f"{_cell(p.reason or 'no error message')}")  # fmt: skip
        else:
            progress = f"last logged step {p.step}" if p.step is not None else "no metrics logged"
            reason = {"damaged": _cell(p.reason or ""), "in progress": f"no final.json yet: {p.reason} is training it"
                      }.get(p.status, "no final.json")
            lines.append(f"- {p.status}: {where}: {reason} ({progress})")
    for v in a.lost:
        lines.append(f"- non-finite score: `{v.run_id}` ({v.group}, seed {v.seed}) finished with {v.key} = {v.value}; "
                     f"{v.group}'s mean of {v.key} (and every test on it) is over one seed fewer")
    return lines + [""]


def _plots_section(plots: Sequence[tuple[str, str]]) -> list[str]:
    return ["## Plots", "", *(f"- [{caption}](plots/{name})" for name, caption in plots), ""]


# -- files -----------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """NaN/inf become null so summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _comparison_json(c: Comparison) -> dict[str, Any]:
    return {**dataclasses.asdict(c), "effect_pct": c.effect_pct, "verdict": c.verdict}


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_report(
    out_dir: Path, runs: list[RunRecord], *, title: str, description: str = "",
    primary: Mapping[str, Any] | None = None,
) -> None:
    """Write summary.csv, summary.json, report.md and plots/*.png for `runs` into `out_dir`.

    `primary`: study.yaml's `{"compare": [A, B], "metric": "<metric>_<set>"}` (strategy labels), or None.
    """
    out_dir = Path(out_dir)
    make_folder(out_dir)
    a = analyse(runs, primary)
    plots = write_plots(out_dir / "plots", group_runs(runs), a)
    rows = summary_rows(runs)
    atomic_write_text(out_dir / "summary.csv", _csv_text(rows, summary_columns(runs)))
    atomic_write_json(out_dir / "summary.json", _json_safe({
        "title": title,
        "counts": a.tally,
        "primary": dataclasses.asdict(a.primary) if a.primary else None,
        "holm_family_size": a.family_size,
        "scoring": dataclasses.asdict(a.scoring),
        "lead_basis": a.lead_basis,
        "groups": [dataclasses.asdict(g) | {"convergence_status": g.convergence.status, "ema_lagging": g.lag.lagging}
                   for g in a.groups],
        "comparisons": [_comparison_json(c) for c in a.comparisons],
        "budgets": [{"axis": t.axis, "budget": t.budget, "rows": [dataclasses.asdict(r) for r in t.rows],
                     "comparisons": [_comparison_json(c) for c in t.comparisons]} for t in a.budgets],
        "landscape": dataclasses.asdict(a.landscape),
        "lost_values": [dataclasses.asdict(v) for v in a.lost],
        "rows": rows,
    }))  # fmt: skip
    body = [
        _verdict_section(a), _yardsticks_section(a), _groups_section(a), _comparisons_section(a),
        _equal_compute_section(a), _diagnostics_section(a), _test_time_section(a), _landscape_section(a),
        _problems_section(a), _plots_section(plots),
    ]  # fmt: skip
    sections = [_header(title, description, a), _answer_section(a), _contents(body), *body]
    atomic_write_text(out_dir / "report.md", "\n".join(line for section in sections for line in section))

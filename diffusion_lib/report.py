"""Study report: per-run summary, seed statistics, pairwise tests, equal-compute reads and plots.

`write_report(out_dir, runs, title=...)` writes, each file atomically:
  summary.csv   one row per run (`summary_rows`), sweep keys as columns
  summary.json  {"title", "counts": {finished, failed, missing}, "groups": [per-group means and
                95 % CI half widths, see `group_summary`], "rows": the summary rows}; NaN is written as null
  report.md     the readable report, linking the PNGs under plots/
A run's numbers come only from its RunRecord (final.json content and metrics.jsonl records).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .stats import WelchResult, interpolate_at, mean_ci, welch_test  # noqa: E402
from .stats import verdict as verdict_word  # noqa: E402
from .utils import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

SETS = (("id", "in-dist"), ("ood", "ood"))
METRIC_LABELS = {f"mse_{name}": label for name, label in SETS}  # the final error metrics compared
FINAL_COLUMNS = ("mse_id", "mse_ood", "mse_id_raw", "mse_ood_raw", "train_seconds", "steps_per_second", "grad_evals")
ROW_COLUMNS = ("seed", "status", *FINAL_COLUMNS, "steps", "error")  # see summary_columns
BUDGET_AXES = (
    ("train_seconds", "matched wall-clock", "training seconds"),
    ("grad_evals", "matched energy-gradient evaluations", "energy-gradient evaluations per sample"),
)
_ABSENT = object()  # a factor a group does not set (differs from every real value)


@dataclass
class RunRecord:
    """One run of a study: its label, sweep values, seed, final.json (None if missing) and metrics."""

    run_id: str
    strategy: str
    sweep: dict[str, Any]
    seed: int
    final: dict[str, Any] | None
    metrics: list[dict[str, Any]]

    @property
    def group(self) -> str:
        """Strategy plus sweep values, e.g. 'adversarial · mining.opt_steps=5'."""
        return " · ".join([self.strategy, *(f"{key}={value}" for key, value in self.sweep.items())])

    @property
    def status(self) -> str:
        if self.final is None:
            return "missing"
        return "finished" if self.final.get("status") == "finished" else "failed"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def curve(self, kind: str, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the `kind` records that carry finite values for both keys, sorted by x."""
        points = [
            (float(r[x_key]), float(r[y_key]))
            for r in self.metrics
            if r.get("kind") == kind and _is_number(r.get(x_key)) and _is_number(r.get(y_key))
        ]
        points.sort(key=lambda p: p[0])
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- tables of numbers ---------------------------------------------------------------------------------
def group_runs(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by group label, groups in the order they first appear."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def final_values(runs: Sequence[RunRecord], key: str) -> list[float]:
    """`final[key]` of each finished run that has it."""
    return [float(r.final[key]) for r in runs if r.finished and r.final.get(key) is not None]


def summary_columns(runs: Sequence[RunRecord]) -> list[str]:
    """The columns of `summary_rows`: sweep keys (in first-seen order) between the labels and the results."""
    return ["run_id", "group", "strategy", *_sweep_keys(runs), *ROW_COLUMNS]


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, in the order of `runs`; every row has every column (None where absent)."""
    sweep_keys = _sweep_keys(runs)
    rows = []
    for run in runs:
        final = run.final or {}
        row: dict[str, Any] = {"run_id": run.run_id, "group": run.group, "strategy": run.strategy}
        row.update({key: run.sweep.get(key) for key in sweep_keys})
        row.update(seed=run.seed, status=run.status)
        row.update({key: final.get(key) for key in FINAL_COLUMNS})
        row.update(steps=final.get("step"), error=final.get("error"))
        rows.append(row)
    return rows


def _sweep_keys(runs: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(key for run in runs for key in run.sweep))


def group_summary(group: str, runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Mean and 95 % CI half width over a group's finished runs of the final metrics."""
    summary: dict[str, Any] = {"group": group, "runs": len(runs), "finished": sum(r.finished for r in runs)}
    for key in FINAL_COLUMNS:
        summary[f"{key}_mean"], summary[f"{key}_ci95"] = mean_ci(final_values(runs, key))
    return summary


@dataclass(frozen=True)
class Comparison:
    """Group `a` vs group `b` (which differ only in `factor`) on one error metric."""

    a: str
    b: str
    factor: str
    metric: str  # "mse_id" or "mse_ood"
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    result: WelchResult

    @property
    def testable(self) -> bool:
        return self.n_a >= 2 and self.n_b >= 2

    @property
    def verdict(self) -> str:
        return verdict_word(self.result)


def _differing_factor(a: RunRecord, b: RunRecord) -> str | None:
    """The one factor (strategy or sweep key) in which two groups differ, else None."""
    fa, fb = {"strategy": a.strategy, **a.sweep}, {"strategy": b.strategy, **b.sweep}
    differ = [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k, _ABSENT) != fb.get(k, _ABSENT)]
    return differ[0] if len(differ) == 1 else None


def pairwise_comparisons(runs: Sequence[RunRecord]) -> list[Comparison]:
    """Welch tests for every pair of groups differing in one factor, as 'later group vs earlier group'."""
    groups = list(group_runs(runs).items())
    comparisons = []
    for j, (name_a, runs_a) in enumerate(groups):
        for name_b, runs_b in groups[:j]:
            factor = _differing_factor(runs_a[0], runs_b[0])
            if factor is None:
                continue
            for metric in METRIC_LABELS:
                va, vb = final_values(runs_a, metric), final_values(runs_b, metric)
                comparisons.append(
                    Comparison(name_a, name_b, factor, metric, len(va), len(vb),
                               mean_ci(va)[0], mean_ci(vb)[0], welch_test(va, vb))  # fmt: skip
                )
    return comparisons


def matched_budget(groups: dict[str, list[RunRecord]], axis: str) -> float:
    """The smallest final `axis` value of any finished run: a budget every finished run reached."""
    values = [v for runs in groups.values() for v in final_values(runs, axis)]
    return min(values) if values else math.nan


def value_at_budget(run: RunRecord, axis: str, metric: str, budget: float) -> float:
    """The run's validation `metric` (EMA) read off its val curve at `axis` = budget; NaN if not reached."""
    xs, ys = run.curve("val", axis, f"val_{metric}")
    return interpolate_at(xs, ys, budget)


# -- formatting ----------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """3 significant digits (whole numbers from 1000), scientific when small or huge; 'n/a' if missing."""
    if not _is_number(value):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e6:
        return f"{value:.2e}"
    if abs(value) >= 1e3:
        return f"{value:.0f}"  # seconds and gradient counts: whole numbers read better than 1.2e+03
    return f"{value:.3g}"


def _pm(mean: float, half: float) -> str:
    return "n/a" if not _is_number(mean) else f"{fmt(mean)} ± {fmt(half)}"


def _mean_pm(values: Sequence[float]) -> str:
    return _pm(*mean_ci(values))


def _cell(text: Any) -> str:
    """Markdown-table-safe text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _json_safe(value: Any) -> Any:
    """NaN/inf become null so summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


# -- report.md sections ---------------------------------------------------------------------------------
def _counts(runs: Sequence[RunRecord]) -> dict[str, int]:
    return {status: sum(r.status == status for r in runs) for status in ("finished", "failed", "missing")}


def _header_section(title: str, description: str, runs: Sequence[RunRecord]) -> list[str]:
    counts = _counts(runs)
    lines = [f"# {title}", ""]
    if description:
        lines += [description.strip(), ""]
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines += [f"**Runs:** {len(runs)} ({tally}).", ""]
    for key, label in (("zeros_mse_id", "in-dist"), ("zeros_mse_ood", "ood")):
        values = final_values(runs, key)
        if not values:
            continue
        spread = ""
        if max(values) > 1.01 * min(values):  # e.g. a sweep over the task: then one number would mislead
            spread = f" (varies across runs: {fmt(min(values))} to {fmt(max(values))})"
        lines.append(f"- Yardstick: predicting all zeros gives {label} MSE {fmt(float(np.mean(values)))}{spread}.")
    return lines + [""]


def _groups_section(groups: dict[str, list[RunRecord]]) -> list[str]:
    rows = []
    for name, runs in groups.items():
        s = group_summary(name, runs)
        rows.append([
            name, f"{s['finished']}/{s['runs']}",
            _pm(s["mse_id_mean"], s["mse_id_ci95"]), _pm(s["mse_ood_mean"], s["mse_ood_ci95"]),
            fmt(s["mse_id_raw_mean"]), fmt(s["mse_ood_raw_mean"]),
            fmt(s["train_seconds_mean"]), fmt(s["steps_per_second_mean"]),
        ])  # fmt: skip
    header = ["group", "n finished/runs", "MSE in-dist (EMA)", "MSE ood (EMA)",
              "raw MSE in-dist", "raw MSE ood", "train s", "steps/s"]  # fmt: skip
    return [
        "## Final results per group",
        "",
        "Mean ± 95 % Student-t half width over finished seeds of the final held-out MSE of the EMA model; "
        "the raw (non-EMA) model, training seconds and steps/s are means. 'n/a': fewer than two seeds.",
        "",
        *_table(header, rows),
    ]


def _comparisons_section(comparisons: list[Comparison]) -> list[str]:
    lines = [
        "## Pairwise comparisons",
        "",
        "Groups that differ in exactly one factor, as 'A vs B'. A − B is the difference of mean final MSE "
        "(negative: A has lower error); the interval is the 95 % Welch–Satterthwaite CI and p the two-sided "
        "Welch t-test p-value. Verdict for A at α = 0.05: better / worse / no detectable difference "
        "(with few seeds, 'no detectable difference' is not evidence that the groups are equal). "
        f"The {len(comparisons)} tests below are not corrected for multiple comparisons: with many of them, "
        "one 'better' or 'worse' at p near 0.05 can be chance.",
        "",
    ]
    if not comparisons:
        return lines + ["No two groups differ in exactly one factor.", ""]
    for a, b, factor in dict.fromkeys((c.a, c.b, c.factor) for c in comparisons):
        parts = [
            f"{METRIC_LABELS[c.metric]} {_verdict_text(c)}" + (f" (p = {fmt(c.result.p_value)})" if c.testable else "")
            for c in comparisons
            if (c.a, c.b) == (a, b)
        ]
        lines.append(f"- **{a} vs {b}** (differ in {factor}): " + "; ".join(parts) + ".")
    lines.append("")
    rows = []
    for c in comparisons:
        r = c.result
        rows.append([
            f"{c.a} vs {c.b}", METRIC_LABELS[c.metric], f"{c.n_a} / {c.n_b}", fmt(c.mean_a), fmt(c.mean_b),
            fmt(r.diff), f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]", fmt(r.p_value), _verdict_text(c),
        ])  # fmt: skip
    header = ["A vs B", "set", "n A / n B", "mean A", "mean B", "A − B", "95 % CI", "Welch p", "verdict"]
    return lines + _table(header, rows)


def _verdict_text(c: Comparison) -> str:
    return c.verdict if c.testable else "n/a (needs ≥ 2 finished runs per group)"


def _equal_compute_section(groups: dict[str, list[RunRecord]]) -> list[str]:
    lines = [
        "## Equal-compute view",
        "",
        "Adversarial mining spends extra energy-gradient evaluations per step, so groups are also compared at "
        "matched budgets. The budget is the smallest final budget of any finished run, so every run reached it; "
        "each finished run's EMA validation MSE is read at that budget from its validation curve, interpolating "
        "linearly in log(MSE) between the bracketing validation points. A run whose curve ends before the budget "
        "(or starts after it) is not extrapolated: it counts as not reached, and the mean ± 95 % CI is over the "
        "runs that reached the budget.",
        "",
    ]
    for letter, (axis, title, unit) in zip("ab", BUDGET_AXES):
        budget = matched_budget(groups, axis)
        lines += [f"### ({letter}) {title.capitalize()}: budget {fmt(budget)} {unit}", ""]
        rows = []
        for name, runs in groups.items():
            finished = [r for r in runs if r.finished]
            if not finished:
                rows.append([name, "n/a", fmt(budget), "0/0", "no finished runs", "no finished runs"])
                continue
            row = [name, _mean_pm(final_values(runs, axis)), fmt(budget)]
            reads = {m: [value_at_budget(r, axis, m, budget) for r in finished] for m in METRIC_LABELS}
            reached = [v for v in reads["mse_id"] if math.isfinite(v)]
            row.append(f"{len(reached)}/{len(finished)}")
            for metric in METRIC_LABELS:
                values = [v for v in reads[metric] if math.isfinite(v)]
                row.append(_mean_pm(values) if values else "not reached")
            rows.append(row)
        header = ["group", f"group's own final {unit}", "budget", "reached",
                  "MSE in-dist at budget", "MSE ood at budget"]  # fmt: skip
        lines += _table(header, rows)
    return lines


def _test_time_section(groups: dict[str, list[RunRecord]]) -> list[str]:
    lines = ["## Test-time compute", ""]
    sweeps = [r.final.get("inference_steps_sweep") or {} for runs in groups.values() for r in runs if r.finished]
    steps = sorted({key for sweep in sweeps for key in sweep}, key=float)
    if not steps:
        return lines + ["No run has an inference-steps sweep (eval.inference_steps_sweep was empty).", ""]
    lines += [
        "Final EMA model's held-out MSE (mean ± 95 % CI over finished seeds) when sampling with a given number "
        "of inner optimisation steps per diffusion timestep.",
        "",
    ]
    for name, label in SETS:
        header = ["group", *(f"{s} inner step{'' if s == '1' else 's'}" for s in steps)]
        rows = [[group, *(_mean_pm(_sweep_values(runs, s, f"mse_{name}")) for s in steps)] for group, runs in groups.items()]
        lines += [f"**{label}**", "", *_table(header, rows)]
    return lines


def _sweep_values(runs: Sequence[RunRecord], steps: str, metric: str) -> list[float]:
    values = []
    for run in runs:
        entry = (run.final.get("inference_steps_sweep") or {}).get(steps, {}) if run.finished else {}
        if _is_number(entry.get(metric)):
            values.append(float(entry[metric]))
    return values


def _problems_section(runs: Sequence[RunRecord]) -> list[str]:
    failed = [r for r in runs if r.status == "failed"]
    missing = [r for r in runs if r.status == "missing"]
    lines = ["## Failed and missing runs", ""]
    if not failed and not missing:
        return lines + ["None: every run finished.", ""]
    for run in failed:
        error = _cell(run.final.get("error") or "no error message")
        where = f"({run.group}, seed {run.seed}) at step {run.final.get('step', 'n/a')}"
        lines.append(f"- failed: `{run.run_id}` {where}: {error}")
    for run in missing:
        steps = [r["step"] for r in run.metrics if _is_number(r.get("step"))]
        progress = f"last logged step {max(steps)}" if steps else "no metrics logged"
        lines.append(f"- missing: `{run.run_id}` ({run.group}, seed {run.seed}): no final.json ({progress})")
    return lines + [""]


def _plots_section(plots: list[tuple[str, str]]) -> list[str]:
    lines = ["## Plots", ""]
    lines += [f"- [{caption}](plots/{name})" for name, caption in plots]
    return lines + [""]


# -- plots ---------------------------------------------------------------------------------------------
def _save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a PNG atomically: readers never see a torn image."""
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"), "wb")
    finally:
        plt.close(fig)


def _two_panels(title: str) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.suptitle(title)
    return fig, axes


def _style_axes(ax: plt.Axes, title: str, xlabel: str, ylabel: str, plotted: list[float]) -> None:
    """Labels, title, legend; log y when the plotted positive values span more than a decade."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    values = [v for v in plotted if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    if not values:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def _mean_on_common_x(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """(x, mean, min, max) over curves at the x values all of them share (seeds log the same steps)."""
    common = sorted(set.intersection(*(set(xs.tolist()) for xs, _ in curves)))
    if not common:
        return (np.array([]),) * 4
    stack = np.array([[dict(zip(xs.tolist(), ys.tolist()))[x] for x in common] for xs, ys in curves])
    return np.array(common), stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)


def _group_curves(runs: Sequence[RunRecord], kind: str, x_key: str, y_key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    curves = [r.curve(kind, x_key, y_key) for r in runs if r.finished]
    return [c for c in curves if c[0].size]


def _plot_mean_band(
    ax: plt.Axes, runs: Sequence[RunRecord], kind: str, x_key: str, y_key: str, label: str, color: Any
) -> list[float]:
    """Mean over seeds (line) and min..max (band) at the shared x values; returns the plotted values."""
    curves = _group_curves(runs, kind, x_key, y_key)
    if not curves:
        return []
    x, mean, low, high = _mean_on_common_x(curves)
    if not x.size:
        return []
    ax.plot(x, mean, color=color, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    return [*low.tolist(), *high.tolist()]


def _plot_val_vs_step(path: Path, groups: dict[str, list[RunRecord]], colors: dict[str, Any]) -> None:
    fig, axes = _two_panels("Validation MSE of the EMA model vs step (line = mean over seeds, band = min..max)")
    for ax, (name, label) in zip(axes, SETS):
        plotted = []
        for group, runs in groups.items():
            plotted += _plot_mean_band(ax, runs, "val", "step", f"val_mse_{name}", group, colors[group])
        _style_axes(ax, label, "training step", "MSE", plotted)
    _save_figure(fig, path)


def _plot_val_vs_seconds(path: Path, groups: dict[str, list[RunRecord]], colors: dict[str, Any]) -> None:
    """Seeds run at different speeds: each seed is a thin line, the mean is read on the shared time range."""
    fig, axes = _two_panels("Validation MSE of the EMA model vs training seconds (thin = seeds, thick = mean)")
    for ax, (name, label) in zip(axes, SETS):
        plotted: list[float] = []
        for group, runs in groups.items():
            curves = _group_curves(runs, "val", "train_seconds", f"val_mse_{name}")
            for xs, ys in curves:
                ax.plot(xs, ys, color=colors[group], alpha=0.35, linewidth=0.8)
                plotted += ys.tolist()
            if not curves:
                continue
            start, end = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
            if start <= end:
                grid = np.linspace(start, end, 60)
                mean = [np.mean([interpolate_at(xs, ys, x) for xs, ys in curves]) for x in grid]
                ax.plot(grid, mean, color=colors[group], linewidth=2, label=f"{group} (n={len(curves)})")
        _style_axes(ax, label, "training seconds", "MSE", plotted)
    _save_figure(fig, path)


def _plot_final_mse(path: Path, groups: dict[str, list[RunRecord]], colors: dict[str, Any]) -> None:
    fig, axes = _two_panels("Final MSE of the EMA model (bar = mean, whisker = 95 % CI, dots = seeds)")
    names = list(groups)
    for ax, (name, label) in zip(axes, SETS):
        plotted: list[float] = []
        for i, group in enumerate(names):
            values = final_values(groups[group], f"mse_{name}")
            if not values:
                ax.text(i, 0.02, "no finished\nruns", transform=ax.get_xaxis_transform(), ha="center", color="grey")
                continue
            mean, half = mean_ci(values)
            half = half if math.isfinite(half) else 0.0  # one seed: no interval to draw
            ax.bar(i, mean, color=colors[group], alpha=0.6, yerr=half, capsize=6)
            ax.scatter(np.full(len(values), i), values, color="black", s=12, zorder=3)
            plotted += [*values, mean - half, mean + half]
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        _style_axes(ax, label, "group", "MSE", [v for v in plotted if v > 0])
    _save_figure(fig, path)


def _plot_training_curves(path: Path, groups: dict[str, list[RunRecord]], colors: dict[str, Any]) -> None:
    fig, axes = _two_panels("Training curves (line = mean over seeds, band = min..max)")
    panels = (("loss", "training loss", "loss"), ("energy_gap", "energy gap E(negative) − E(positive)", "energy gap"))
    for ax, (key, title, ylabel) in zip(axes, panels):
        plotted = []
        for group, runs in groups.items():
            plotted += _plot_mean_band(ax, runs, "train", "step", key, group, colors[group])
        _style_axes(ax, title, "training step", ylabel, plotted)
    _save_figure(fig, path)


def _plot_inference_steps(
    path: Path, groups: dict[str, list[RunRecord]], colors: dict[str, Any], steps: list[str]
) -> None:
    fig, axes = _two_panels("Final EMA model's MSE vs inference inner steps (mean ± 95 % CI over seeds)")
    for ax, (name, label) in zip(axes, SETS):
        plotted: list[float] = []
        for group, runs in groups.items():
            points = [(float(s), *mean_ci(v)) for s in steps if (v := _sweep_values(runs, s, f"mse_{name}"))]
            if not points:
                continue
            x, mean, half = (np.array(p) for p in zip(*points))
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), color=colors[group], marker="o", capsize=4, label=group)
            plotted += mean.tolist()
        _style_axes(ax, label, "inner steps per timestep", "MSE", plotted)
    _save_figure(fig, path)


def _write_plots(plot_dir: Path, groups: dict[str, list[RunRecord]]) -> list[tuple[str, str]]:
    """Draw every plot the data allow; returns (file name, caption) of those written."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    colors = {group: plt.get_cmap("tab10")(i % 10) for i, group in enumerate(groups)}
    plots = [
        ("val_mse_vs_step.png", "Validation MSE vs training step", _plot_val_vs_step),
        ("val_mse_vs_seconds.png", "Validation MSE vs training seconds", _plot_val_vs_seconds),
        ("final_mse.png", "Final MSE per group with 95 % CI", _plot_final_mse),
        ("training_curves.png", "Training loss and energy gap vs step", _plot_training_curves),
    ]
    written = []
    for name, caption, draw in plots:
        draw(plot_dir / name, groups, colors)
        written.append((name, caption))
    steps = sorted({s for runs in groups.values() for r in runs if r.finished
                    for s in (r.final.get("inference_steps_sweep") or {})}, key=float)  # fmt: skip
    inference = plot_dir / "mse_vs_inference_steps.png"
    if steps:
        _plot_inference_steps(inference, groups, colors, steps)
        written.append((inference.name, "MSE vs inference inner steps"))
    else:
        inference.unlink(missing_ok=True)  # a stale plot from an earlier report would contradict this one
    return written


# -- the report ----------------------------------------------------------------------------------------
def write_report(out_dir: Path, runs: list[RunRecord], *, title: str, description: str = "") -> None:
    """Write summary.csv, summary.json, report.md and plots/*.png for `runs` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = summary_rows(runs)
    plots = _write_plots(out_dir / "plots", groups)

    atomic_write_text(out_dir / "summary.csv", _csv_text(rows, summary_columns(runs)))
    atomic_write_json(out_dir / "summary.json", _json_safe({
        "title": title,
        "counts": _counts(runs),
        "groups": [group_summary(name, group) for name, group in groups.items()],
        "rows": rows,
    }))  # fmt: skip
    sections = [
        _header_section(title, description, runs),
        _groups_section(groups),
        _comparisons_section(pairwise_comparisons(runs)),
        _equal_compute_section(groups),
        _test_time_section(groups),
        _problems_section(runs),
        _plots_section(plots),
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(line for section in sections for line in section))

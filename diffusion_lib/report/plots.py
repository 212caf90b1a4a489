"""The report's figures (matplotlib, headless), each saved atomically as a PNG.

`write_plots(plot_dir, groups, analysis)` draws every figure the data allow and returns (file name,
caption) pairs for report.md: per metric the runs declare, its validation curves (val_<metric>_vs_step,
_vs_flops, _vs_seconds), its final values (final_<metric>) and its inference-steps sweep
(<metric>_vs_inference_steps); and the training curves. Every number drawn (curves, their means over
seeds, yardsticks, CIs) comes from analysis.py and the modules it composes; nothing is computed here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from diffusion_lib.report.analysis import StudyAnalysis  # noqa: E402
from diffusion_lib.report.scores import (  # noqa: E402
    BASES, Curve, Score, accept_rate_step_curves, final_values, finished, mean_on_shared_range, run_curves, seed_band,
)
from diffusion_lib.harness.run_dir import RunRecord  # noqa: E402
from diffusion_lib.harness.io import atomic_write, make_folder  # noqa: E402

Groups = Mapping[str, Sequence[RunRecord]]
YARDSTICK_STYLES = (":", "-.", "--", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1)))  # by the yardstick's position
# words for the names runs record (report.md uses them too); a name not listed here is shown as it is
SET_WORDS = {"id": "in-distribution"}
YARDSTICK_WORDS = {  # name -> (short name, what it is)
    "zeros": ("zeros predictor", "predicts all zeros"),
    "train_mean": ("training-mean predictor", "predicts the per-entry mean of the training answers"),
    "linear": ("linear map", "least-squares linear map from the condition to the answer, fit on training problems"),
    "clamp_floor": ("clamp floor", "the true answer clamped to the answer bound: the error clamping alone causes"),
    # connectivity
    "adjacent": ("adjacency", "connected iff adjacent, taken literally (so every diagonal entry is wrong)"),
    "all_connected": ("all connected", "every pair connected"),
    "majority": ("majority label", "the training distribution's majority answer off the diagonal, connected on it"),
    **{f"within_{k}_hops": (f"within {k} hops", f"connected iff at most {k} edges apart") for k in (1, 2, 3)},
    # Sudoku
    "random_fill": ("random fill", "the givens kept, every blank a uniform random digit"),
    "propagation": ("propagation alone", "naked and hidden singles to a fixed point, blanks it cannot decide left wrong"),
    "solver": ("exact solver", "a complete backtracking search: every board valid"),
}


def set_words(name: str) -> str:
    return SET_WORDS.get(name, name)


def stick_words(name: str) -> str:
    return YARDSTICK_WORDS.get(name, (name, ""))[0]


def _save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a PNG atomically: readers never see a torn image."""
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100), "wb")
    finally:
        plt.close(fig)


def _figure(rows: int, cols: int, title: str, size: tuple[float, float]) -> tuple[plt.Figure, np.ndarray]:
    """A grid of panels with room for titles and labels (fixed spacing: a layout engine doubles the drawing time)."""
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1 if rows > 1 else 0.2, top=0.92 if rows > 1 else 0.86,
                        hspace=0.3, wspace=0.2)  # fmt: skip
    return fig, axes


def _style_axes(ax: plt.Axes, title: str, xlabel: str, ylabel: str, plotted: list[float], integer_x: bool = False) -> None:
    """Labels and grid; log y when the plotted positive values span more than a decade."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    values = [v for v in plotted if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    if not values:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    if integer_x:  # steps and inner-step counts are whole numbers: no 2.5 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _legend(ax: plt.Axes, colors: Mapping[str, Any], counts: Mapping[str, int], extra: Sequence[Line2D] = ()) -> None:
    """One entry per group in every panel, with its number of seeds drawn ('no data' when none), then `extra`."""
    handles = [Line2D([], [], color=color if counts.get(g) else "lightgrey", linewidth=2,
                      label=f"{g} (n={counts[g]})" if counts.get(g) else f"{g} (no data)")
               for g, color in colors.items()]  # fmt: skip
    ax.legend(handles=[*handles, *extra], fontsize="small", loc="best")


def _yardstick_lines(ax: plt.Axes, analysis: StudyAnalysis, score: Score) -> tuple[list[float], list[Line2D]]:
    """The yardsticks of the score's set and metric as grey horizontal lines; returns their values (for the
    axis scale) and their legend entries."""
    values, handles = [], []
    names = list(dict.fromkeys(row.name for row in analysis.yardsticks[score.set]))
    for row in analysis.yardsticks[score.set]:
        if row.metric != score.metric or not math.isfinite(row.mean):
            continue
        style = {"color": "dimgrey", "linestyle": YARDSTICK_STYLES[names.index(row.name) % len(YARDSTICK_STYLES)],
                 "linewidth": 1}  # fmt: skip
        ax.axhline(row.mean, **style)
        note = " (mean; varies across runs)" if row.varies else ""
        handles.append(Line2D([], [], **style, label=f"yardstick: {stick_words(row.name)}{note}"))
        values.append(row.mean)
    return values, handles


def _panels(analysis: StudyAnalysis, metric: str) -> list[Score]:
    """One panel per (set, basis) of `metric`: sets down, EMA and raw across."""
    return analysis.scoring.scores([metric])


def _panel_title(score: Score) -> str:
    return f"{set_words(score.set)}, {BASES[score.basis]} model"


def _mean_band(ax: plt.Axes, curves: list[Curve], color: Any, **style: Any) -> list[float]:
    """Mean over seeds (line) and min..max (band) at the shared x; seeds as thin lines if they share none."""
    x, mean, low, high = seed_band(curves)
    if not x.size:
        for xs, ys in curves:
            ax.plot(xs, ys, color=color, alpha=0.5, linewidth=0.8, **style)
        return [v for _, ys in curves for v in ys.tolist()]
    ax.plot(x, mean, color=color, **style)
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
    return [*low.tolist(), *high.tolist()]


def _val_vs_step(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, metric: str) -> None:
    label, sets = analysis.scoring.metrics[metric].label, analysis.scoring.sets
    fig, axes = _figure(len(sets), 2, f"Validation {label} vs training step (line = mean over seeds, band = "
                                      "min..max; grey = yardsticks)", (13, 4.5 * len(sets)))  # fmt: skip
    for ax, score in zip(axes.flat, _panels(analysis, metric)):
        plotted, counts = [], {}
        for group, runs in groups.items():
            curves = run_curves(runs, "val", "step", score.val_key)
            counts[group] = len(curves)
            if curves:
                plotted += _mean_band(ax, curves, colors[group])
        sticks, handles = _yardstick_lines(ax, analysis, score) if plotted else ([], [])
        _style_axes(ax, _panel_title(score), "training step", label, plotted + sticks, integer_x=True)
        _legend(ax, colors, counts, handles)
    _save_figure(fig, path)


def _val_vs_axis(
    path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, metric: str, x_key: str, xlabel: str
) -> None:
    """Seeds run at different speeds: each seed is a thin line, the group mean (thick) is read on the range
    all its seeds cover; every group gets a legend entry even when its seeds' ranges do not overlap."""
    label, sets = analysis.scoring.metrics[metric].label, analysis.scoring.sets
    fig, axes = _figure(len(sets), 2, f"Validation {label} vs {xlabel} (thin = seeds, thick = mean over the range "
                                      "every seed covers)", (13, 4.5 * len(sets)))  # fmt: skip
    for ax, score in zip(axes.flat, _panels(analysis, metric)):
        plotted, counts = [], {}
        for group, runs in groups.items():
            curves = run_curves(runs, "val", x_key, score.val_key)
            counts[group] = len(curves)
            for xs, ys in curves:
                ax.plot(xs, ys, color=colors[group], alpha=0.55, linewidth=1)
                plotted += ys.tolist()
            if not curves:
                continue
            grid, mean = mean_on_shared_range(curves)
            ax.plot(grid, mean, color=colors[group], linewidth=2)
        sticks, handles = _yardstick_lines(ax, analysis, score) if plotted else ([], [])
        _style_axes(ax, _panel_title(score), xlabel, label, plotted + sticks)
        _legend(ax, colors, counts, handles)
    _save_figure(fig, path)


def _final_values(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, metric: str) -> None:
    """Per group: EMA (circle) and raw (square) side by side, mean with 95 % CI bar, seeds as dots."""
    label, sets = analysis.scoring.metrics[metric].label, analysis.scoring.sets
    fig, axes = _figure(1, len(sets), f"Final {label} per group (marker = mean, bar = 95 % CI, dots = seeds; "
                                      "circle = EMA, square = raw)", (6.5 * len(sets), 5))  # fmt: skip
    names = list(groups)
    estimates = {g.group: g.values for g in analysis.groups}
    for ax, set_name in zip(axes[0], sets):
        plotted: list[float] = []
        for i, group in enumerate(names):
            for offset, basis, marker in ((-0.15, "ema", "o"), (0.15, "raw", "s")):
                key = Score(metric, set_name, basis).key
                values, e = final_values(groups[group], key), estimates[group][key]
                if not values:
                    continue
                half = e.half if math.isfinite(e.half) else 0.0  # one seed: no interval to draw
                ax.errorbar(i + offset, e.mean, yerr=half, color=colors[group], marker=marker, markersize=7,
                            capsize=5, linestyle="none")  # fmt: skip
                ax.scatter(np.full(len(values), i + offset + 0.08), values, color="black", s=8, zorder=3)
                plotted += [*values, e.mean - half, e.mean + half]
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        _style_axes(ax, set_words(set_name), "group", label, [v for v in plotted if v > 0])
        ax.legend(handles=[Line2D([], [], color="black", marker="o", linestyle="none", label="EMA model"),
                           Line2D([], [], color="black", marker="s", linestyle="none", label="raw model")],
                  fontsize="small")  # fmt: skip
    _save_figure(fig, path)


TRAINING_PANELS = (
    ("loss_denoise", "score (denoising) loss", "loss"),
    ("energy_gap", "energy gap E(negative) − E(positive)", "energy gap"),
    ("accept_rate", "mining accept rate (mean over inner steps)", "accept rate"),
    ("accept_rate_steps", "mining accept rate per inner step (line style = step)", "accept rate"),
    ("energy_decrease", "energy decrease E(start) − E(negative)", "energy decrease"),
    ("move_rms", "RMS distance the negatives moved", "RMS distance"),
)
STEP_STYLES = ("-", "--", ":", "-.")


def _training_curves(path: Path, groups: Groups, colors: dict[str, Any]) -> None:
    fig, axes = _figure(2, 3, "Training curves (line = mean over seeds, band = min..max); mining panels: strategies "
                              "that mine by descent", (17, 9))
    for ax, (key, title, ylabel) in zip(axes.flat, TRAINING_PANELS):
        plotted, counts, inner_steps = [], {}, 0
        for group, runs in groups.items():
            if key == "accept_rate_steps":
                per_run = [c for r in finished(runs) if (c := accept_rate_step_curves(r))]
                counts[group] = len(per_run)
                inner_steps = max([inner_steps, *(len(c) for c in per_run)])
                for i in range(max((len(c) for c in per_run), default=0)):
                    curves = [c[i] for c in per_run if len(c) > i and c[i][0].size]
                    if curves:
                        plotted += _mean_band(ax, curves, colors[group], linestyle=STEP_STYLES[i % len(STEP_STYLES)])
                continue
            curves = run_curves(runs, "train", "step", key)
            counts[group] = len(curves)
            if curves:
                plotted += _mean_band(ax, curves, colors[group])
        _style_axes(ax, title, "training step", ylabel, plotted, integer_x=True)
        styles = [Line2D([], [], color="black", linestyle=STEP_STYLES[i % len(STEP_STYLES)], label=f"inner step {i + 1}")
                  for i in range(inner_steps)]  # fmt: skip
        _legend(ax, colors, counts, styles)
    _save_figure(fig, path)


def _inference_steps(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, metric: str) -> None:
    label, sets = analysis.scoring.metrics[metric].label, analysis.scoring.sets
    fig, axes = _figure(1, len(sets), f"Final EMA model's {label} vs inference inner steps (mean ± 95 % CI over "
                                      "seeds)", (6.5 * len(sets), 5))  # fmt: skip
    for ax, set_name in zip(axes[0], sets):
        plotted: list[float] = []
        counts = {}
        for group in groups:
            cells = analysis.inference[group][Score(metric, set_name, "ema").name]
            points = [(float(k), e.mean, e.half) for k, e in cells.items() if e.n]
            counts[group] = max((e.n for e in cells.values()), default=0)
            if not points:
                continue
            x, mean, half = (np.array(p) for p in zip(*points))
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), color=colors[group], marker="o", capsize=4)
            plotted += mean.tolist()
        _style_axes(ax, set_words(set_name), "inner steps per timestep", label, plotted, integer_x=True)
        _legend(ax, colors, counts)
    _save_figure(fig, path)


def _answer_flops(path: Path, colors: dict[str, Any], analysis: StudyAnalysis) -> None:
    """The headline error vs FLOPs per answer: per group, the inner-steps sweep (solid) and best-of-N with the
    energy pick (dashed), so the two ways of spending test-time compute meet on one axis."""
    metric = next(iter(analysis.scoring.metrics))
    label, sets = analysis.scoring.metrics[metric].label, analysis.scoring.sets
    fig, axes = _figure(1, len(sets), f"Final EMA model's {label} vs FLOPs per answer: more inner steps (solid) "
                                      "or best-of-N by energy (dashed)", (6.5 * len(sets), 5))  # fmt: skip
    styles = {"inner steps": "-", "best-of-N": "--"}
    for ax, set_name in zip(axes[0], sets):
        plotted: list[float] = []
        counts: dict[str, int] = {}
        for curve in (c for c in analysis.landscape.curves if c.set == set_name):
            x = np.array([p[0] for p in curve.points])
            mean, half = np.array([p[1].mean for p in curve.points]), np.array([p[1].half for p in curve.points])
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), color=colors[curve.group], marker="o", capsize=3,
                        linestyle=styles[curve.kind])
            for xi, yi, text in zip(x, mean, (p[2] for p in curve.points)):
                ax.annotate(text, (xi, yi), fontsize="x-small", textcoords="offset points", xytext=(3, 3))
            counts[curve.group] = max(counts.get(curve.group, 0), max(p[1].n for p in curve.points))
            plotted += mean.tolist()
        ax.set_xscale("log")
        _style_axes(ax, set_words(set_name), "FLOPs per answer (sampling and, for best-of-N, scoring)", label, plotted)
        kinds = [Line2D([], [], color="black", linestyle=v, label=k) for k, v in styles.items()]
        _legend(ax, colors, counts, kinds)
    _save_figure(fig, path)


def _metric_plots(groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, metric: str) -> list[tuple]:
    """(file name, caption, draw) of the figures of one metric."""
    label = analysis.scoring.metrics[metric].label
    return [
        (f"val_{metric}_vs_step.png", f"Validation {label} (EMA and raw) vs training step, with yardsticks",
         lambda p: _val_vs_step(p, groups, colors, analysis, metric)),
        (f"val_{metric}_vs_flops.png", f"Validation {label} vs measured training FLOPs",
         lambda p: _val_vs_axis(p, groups, colors, analysis, metric, "flops", "training FLOPs")),
        (f"val_{metric}_vs_seconds.png", f"Validation {label} vs training seconds",
         lambda p: _val_vs_axis(p, groups, colors, analysis, metric, "train_seconds", "training seconds")),
        (f"final_{metric}.png", f"Final {label} per group (EMA and raw) with 95 % CI and seeds",
         lambda p: _final_values(p, groups, colors, analysis, metric)),
    ]  # fmt: skip


def write_plots(plot_dir: Path, groups: Groups, analysis: StudyAnalysis) -> list[tuple[str, str]]:
    """Draw every plot the data allow; returns (file name, caption) of those written."""
    make_folder(plot_dir)  # names a file in the way as such (mkdir says "File exists")
    colors = {group: plt.get_cmap("tab10")(i % 10) for i, group in enumerate(groups)}
    plots = [entry for metric in analysis.scoring.metrics for entry in _metric_plots(groups, colors, analysis, metric)]
    plots.append(("training_curves.png", "Score loss, energy gap and mining diagnostics vs step",
                  lambda p: _training_curves(p, groups, colors)))  # fmt: skip
    for name, _, draw in plots:
        draw(plot_dir / name)
    written = [(name, caption) for name, caption, _ in plots]
    for metric, spec in analysis.scoring.metrics.items():
        inference = plot_dir / f"{metric}_vs_inference_steps.png"
        if analysis.inference_steps:
            _inference_steps(inference, groups, colors, analysis, metric)
            written.append((inference.name, f"Final EMA {spec.label} vs inference inner steps"))
        else:
            inference.unlink(missing_ok=True)  # a stale plot from an earlier report would contradict this one
    flops = plot_dir / "error_vs_answer_flops.png"
    if analysis.landscape.curves:
        _answer_flops(flops, colors, analysis)
        written.append((flops.name, "Final EMA headline score vs FLOPs per answer: inner steps and best-of-N"))
    else:
        flops.unlink(missing_ok=True)
    return written

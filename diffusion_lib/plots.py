"""The report's figures (matplotlib, headless), each saved atomically as a PNG.

`write_plots(plot_dir, groups, analysis)` draws every figure the data allow and returns (file name,
caption) pairs for report.md. Every number drawn (curves, their means over seeds, yardsticks, CIs) comes
from analysis.py; nothing is computed here.
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

from .analysis import (  # noqa: E402
    BASES, SETS, YARDSTICKS, Curve, Metric, StudyAnalysis, accept_rate_step_curves, final_values, finished,
    mean_on_shared_range, run_curves, seed_band,
)
from .results import RunRecord  # noqa: E402
from .files import atomic_write, make_folder  # noqa: E402

Groups = Mapping[str, Sequence[RunRecord]]
YARDSTICK_STYLES = {"zeros": ":", "train_mean": "-.", "linear": "--", "clamp_floor": (0, (1, 3))}


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


def _yardstick_lines(ax: plt.Axes, analysis: StudyAnalysis, set_name: str) -> tuple[list[float], list[Line2D]]:
    """The set's yardsticks as grey horizontal lines; returns their values (for the axis scale) and their
    legend entries."""
    values, handles = [], []
    for row in analysis.yardsticks[set_name]:
        if not math.isfinite(row.mean):
            continue
        style = {"color": "dimgrey", "linestyle": YARDSTICK_STYLES[row.name], "linewidth": 1}
        ax.axhline(row.mean, **style)
        note = " (mean; varies across runs)" if row.varies else ""
        handles.append(Line2D([], [], **style, label=f"yardstick: {YARDSTICKS[row.name][0]}{note}"))
        values.append(row.mean)
    return values, handles


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


def _val_vs_step(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis) -> None:
    fig, axes = _figure(2, 2, "Validation MSE vs training step (line = mean over seeds, band = min..max; "
                              "grey = yardsticks)", (13, 9))
    for row, set_name in enumerate(SETS):
        for col, basis in enumerate(BASES):
            ax, metric = axes[row][col], Metric(set_name, basis)
            plotted, counts = [], {}
            for group, runs in groups.items():
                curves = run_curves(runs, "val", "step", metric.val_key)
                counts[group] = len(curves)
                if curves:
                    plotted += _mean_band(ax, curves, colors[group])
            sticks, handles = _yardstick_lines(ax, analysis, set_name) if plotted else ([], [])
            _style_axes(ax, f"{SETS[set_name]}, {BASES[basis]} model", "training step", "MSE", plotted + sticks,
                        integer_x=True)
            _legend(ax, colors, counts, handles)
    _save_figure(fig, path)


def _val_vs_axis(
    path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis, x_key: str, xlabel: str
) -> None:
    """Seeds run at different speeds: each seed is a thin line, the group mean (thick) is read on the range
    all its seeds cover; every group gets a legend entry even when its seeds' ranges do not overlap."""
    fig, axes = _figure(2, 2, f"Validation MSE vs {xlabel} (thin = seeds, thick = mean over the range every seed "
                              "covers)", (13, 9))
    for row, set_name in enumerate(SETS):
        for col, basis in enumerate(BASES):
            ax, metric = axes[row][col], Metric(set_name, basis)
            plotted, counts = [], {}
            for group, runs in groups.items():
                curves = run_curves(runs, "val", x_key, metric.val_key)
                counts[group] = len(curves)
                for xs, ys in curves:
                    ax.plot(xs, ys, color=colors[group], alpha=0.55, linewidth=1)
                    plotted += ys.tolist()
                if not curves:
                    continue
                grid, mean = mean_on_shared_range(curves)
                ax.plot(grid, mean, color=colors[group], linewidth=2)
            sticks, handles = _yardstick_lines(ax, analysis, set_name) if plotted else ([], [])
            _style_axes(ax, f"{SETS[set_name]}, {BASES[basis]} model", xlabel, "MSE", plotted + sticks)
            _legend(ax, colors, counts, handles)
    _save_figure(fig, path)


def _final_mse(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis) -> None:
    """Per group: EMA (circle) and raw (square) side by side, mean with 95 % CI bar, seeds as dots."""
    fig, axes = _figure(1, 2, "Final MSE per group (marker = mean, bar = 95 % CI, dots = seeds; circle = EMA, "
                              "square = raw)", (13, 5))
    names = list(groups)
    estimates = {g.group: g.mse for g in analysis.groups}
    for ax, set_name in zip(axes[0], SETS):
        plotted: list[float] = []
        for i, group in enumerate(names):
            for offset, basis, marker in ((-0.15, "ema", "o"), (0.15, "raw", "s")):
                key = Metric(set_name, basis).key
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
        _style_axes(ax, SETS[set_name], "group", "MSE", [v for v in plotted if v > 0])
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


def _inference_steps(path: Path, groups: Groups, colors: dict[str, Any], analysis: StudyAnalysis) -> None:
    fig, axes = _figure(1, 2, "Final EMA model's MSE vs inference inner steps (mean ± 95 % CI over seeds)", (13, 5))
    for ax, set_name in zip(axes[0], SETS):
        plotted: list[float] = []
        counts = {}
        for group in groups:
            cells = analysis.inference[group][set_name]
            points = [(float(k), e.mean, e.half) for k, e in cells.items() if e.n]
            counts[group] = max((e.n for e in cells.values()), default=0)
            if not points:
                continue
            x, mean, half = (np.array(p) for p in zip(*points))
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), color=colors[group], marker="o", capsize=4)
            plotted += mean.tolist()
        _style_axes(ax, SETS[set_name], "inner steps per timestep", "MSE", plotted, integer_x=True)
        _legend(ax, colors, counts)
    _save_figure(fig, path)


def write_plots(plot_dir: Path, groups: Groups, analysis: StudyAnalysis) -> list[tuple[str, str]]:
    """Draw every plot the data allow; returns (file name, caption) of those written."""
    make_folder(plot_dir)  # names a file in the way as such (mkdir says "File exists")
    colors = {group: plt.get_cmap("tab10")(i % 10) for i, group in enumerate(groups)}
    plots = [
        ("val_mse_vs_step.png", "Validation MSE (EMA and raw) vs training step, with yardsticks",
         lambda p: _val_vs_step(p, groups, colors, analysis)),
        ("val_mse_vs_flops.png", "Validation MSE vs measured training FLOPs",
         lambda p: _val_vs_axis(p, groups, colors, analysis, "flops", "training FLOPs")),
        ("val_mse_vs_seconds.png", "Validation MSE vs training seconds",
         lambda p: _val_vs_axis(p, groups, colors, analysis, "train_seconds", "training seconds")),
        ("final_mse.png", "Final MSE per group (EMA and raw) with 95 % CI and seeds",
         lambda p: _final_mse(p, groups, colors, analysis)),
        ("training_curves.png", "Score loss, energy gap and mining diagnostics vs step",
         lambda p: _training_curves(p, groups, colors)),
    ]  # fmt: skip
    for name, _, draw in plots:
        draw(plot_dir / name)
    written = [(name, caption) for name, caption, _ in plots]
    inference = plot_dir / "mse_vs_inference_steps.png"
    if analysis.inference_steps:
        _inference_steps(inference, groups, colors, analysis)
        written.append((inference.name, "Final EMA MSE vs inference inner steps"))
    else:
        inference.unlink(missing_ok=True)  # a stale plot from an earlier report would contradict this one
    return written

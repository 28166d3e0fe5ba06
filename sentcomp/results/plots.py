"""Figures shared by the programs and the cross-run report (:mod:`sentcomp.report`): pure functions, data in,
one PNG out (matplotlib's Agg backend, no display needed).

* :func:`accuracy_bars`: accuracies as grouped bars (one group per table row, one bar per column) with their
  95% intervals as error bars; Table-1 runs (``results.png``) and the report (``accuracy.png``);
* :func:`training_curves`: every numeric column of ``metrics.jsonl`` rows against ``step``, one panel per metric,
  one line per run; pretraining and fine-tuning (``curves.png``) and the report (``curves.png``);
* :func:`sweep_points`: each headline metric against each swept hyperparameter (``sweep_<name>.png``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentcomp.results import storage

# the metrics.jsonl columns a training program's own curves.png shows: losses, validation metrics, probes
# One bar of :func:`accuracy_bars`: (accuracy, low, high) as fractions; low/high None: no error bar.
AccuracyBar = tuple[float, float | None, float | None]
LEARNING_CURVES = ("train_loss", "val_", "probe_")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only; safe on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_number(value: Any) -> bool:
    """A finite-or-not real number that is not a bool (``True`` is a verdict, not a measurement)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def panel_grid(count: int, width: float = 4.0, height: float = 3.0, max_columns: int = 4):
    """A figure with ``count`` panels on a grid of at most ``max_columns`` columns; unused panels hidden."""
    columns = max(1, min(max_columns, count))
    rows = max(1, math.ceil(count / columns))
    figure, axes = pyplot().subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False,
                                     layout="constrained")
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def save(figure, path: str | Path, title: str = "") -> Path:
    """Writes ``figure`` to ``path`` (parents created; the figure's title on top) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


# --------------------------------------------------------------------------------------------- accuracies


def accuracy_bars(groups: Mapping[str, Mapping[str, AccuracyBar]], path: str | Path, title: str = "",
                  caption: str = "error bars: 95% Wilson intervals") -> Path:
    """Grouped bars of accuracies in %: ``groups`` is ``{group: {series: (value, low, high)}}`` (fractions in
    [0, 1]; ``low``/``high`` None: no error bar). One group of bars per table row, one colour per column."""
    series = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    if not series:
        raise ValueError("accuracy_bars: no accuracies to plot.")
    plt = pyplot()
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.35 * len(series) * len(groups) + 2), 4.2), layout="constrained")
    for index, name in enumerate(series):
        xs: list[float] = []
        values: list[float] = []
        errors: list[list[float]] = [[], []]  # below and above each bar
        for position, bars in enumerate(groups.values()):
            if name not in bars:
                continue
            value, low, high = bars[name]
            xs.append(position - 0.4 + width * (index + 0.5))
            values.append(100 * value)
            errors[0].append(100 * max(value - low, 0.0) if low is not None else 0.0)
            errors[1].append(100 * max(high - value, 0.0) if high is not None else 0.0)
        axis.bar(xs, values, width, yerr=errors, capsize=2, label=name, color=plt.cm.tab10(index % 10))
    axis.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 3 else 0, ha="right"
                    if len(groups) > 3 else "center", fontsize=8)
    axis.set_ylim(0, 100)
    axis.set_ylabel("test accuracy (%)")
    axis.set_xlabel(caption, fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(4, len(series)), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(figure, path, title)


# ------------------------------------------------------------------------------------------------- curves


def metric_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` for every numeric (dotted, see :func:`flatten`) column of metrics rows
    that have a ``step``, sorted by step."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if not is_number(row.get("step")):
            continue
        for name, value in storage.flatten(row).items():
            if name != "step" and is_number(value):
                series.setdefault(name, []).append((row["step"], value))
    return {name: sorted(points) for name, points in series.items()}


def training_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "",
                    prefixes: Sequence[str] | None = None) -> Path:
    """Every numeric metrics column against ``step``: one panel per metric, one line per entry of ``curves``
    (``{run label: metrics.jsonl rows}``; nested dicts give dotted names). ``prefixes``: only the metrics whose
    name starts with one of them (e.g. :data:`LEARNING_CURVES`); None: every column that takes more than one
    value (a constant such as a test-set size is left out, unless all are)."""
    per_run = {label: metric_series(rows) for label, rows in curves.items()}
    metrics = [name for name in dict.fromkeys(name for series in per_run.values() for name in series)
               if prefixes is None or name.startswith(tuple(prefixes))]
    if prefixes is None:  # all columns: leave out those with one value everywhere (test-set sizes, grids)
        varying = [name for name in metrics if len({value for series in per_run.values()
                                                     for _, value in series.get(name, ())}) > 1]
        metrics = varying or metrics
    if not metrics:
        raise ValueError(f"training_curves: no numeric metrics with a step to plot for {list(curves)}.")
    figure, axes = panel_grid(len(metrics))
    for axis, metric in zip(axes, metrics):
        for label, series in per_run.items():
            if metric in series:
                steps, values = zip(*series[metric])
                axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    if len(curves) > 1:
        axes[0].legend(fontsize=7)
    return save(figure, path, title)


# ------------------------------------------------------------------------------------------------- sweeps


def axis_positions(values: Sequence[Any]) -> tuple[list[float], list[str] | None]:
    """x positions of hyperparameter values: the numbers themselves, or (anything else) the index of each
    distinct value in first-seen order with its text as tick label."""
    if all(is_number(value) for value in values):
        return [float(value) for value in values], None
    labels = list(dict.fromkeys(str(value) for value in values))
    return [float(labels.index(str(value))) for value in values], labels


def sweep_points(points: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], path: str | Path,
                 title: str = "") -> Path:
    """Each numeric headline metric against each swept hyperparameter: ``points`` is ``[(params, metrics)]`` (one
    per finished sweep point). A panel per (metric, parameter); points sharing the other parameters are joined
    by a line labelled with them; numeric parameters spanning over a factor 10 get a log axis. Metrics with the
    same value at every point (step counts, data sizes) are left out when some metric varies: they say nothing
    about the sweep."""
    params = list(dict.fromkeys(key for point, _ in points for key in point))
    numeric = list(dict.fromkeys(key for _, values in points for key, value in values.items() if is_number(value)))
    metrics = [key for key in numeric if len({values.get(key) for _, values in points}) > 1] or numeric
    if not params or not metrics:
        raise ValueError("sweep_points: need swept parameters and numeric metrics.")
    figure, axes = panel_grid(len(metrics) * len(params), width=3.6, height=2.8, max_columns=len(params))
    for index, (metric, param) in enumerate((m, p) for m in metrics for p in params):
        axis = axes[index]
        xs, labels = axis_positions([point.get(param) for point, _ in points])
        lines: dict[str, list[tuple[float, float]]] = {}
        for x, (point, values) in zip(xs, points):
            if is_number(values.get(metric)):
                others = ", ".join(f"{k}={v}" for k, v in point.items() if k != param)
                lines.setdefault(others, []).append((x, values[metric]))
        for others, line in lines.items():
            line.sort()
            axis.plot(*zip(*line), marker="o", label=others or None)
        if labels is not None:
            axis.set_xticks(range(len(labels)), labels, fontsize=7)
        elif min(xs) > 0 and max(xs) > 10 * min(xs):
            axis.set_xscale("log")
        axis.set_xlabel(param, fontsize=8)
        axis.set_ylabel(metric, fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if len(lines) > 1 and index < len(params):
            axis.legend(fontsize=6)
    return save(figure, path, title)


def bound_vs_epsilon(series: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "") -> Path:
    """The theorem against ε: per model (one colour each), across its checkpoints, the bound ``τ + sqrt(2B²ε)``
    (solid), the plug-in loss (dashed) and the probe's test loss (dotted, where measured) against ε on a log
    axis. ``series``: ``{model: [{"epsilon", "bound", "plug_in", "probe_loss"?}, ...]}``."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for index, (name, points) in enumerate(series.items()):
        colour = f"C{index}"
        points = sorted(points, key=lambda p: p["epsilon"])
        eps = [max(p["epsilon"], 1e-9) for p in points]
        axis.plot(eps, [p["bound"] for p in points], "-o", color=colour, label=f"{name}: bound")
        axis.plot(eps, [p["plug_in"] for p in points], "--s", color=colour, label=f"{name}: plug-in loss")
        probes = [(e, p["probe_loss"]) for e, p in zip(eps, points) if is_number(p.get("probe_loss"))]
        if probes:
            axis.plot(*zip(*probes), ":^", color=colour, label=f"{name}: probe test loss")
    axis.set_xscale("log")
    axis.set_xlabel("ε = mean KL(p_T ‖ p_f) on the task's contexts")
    axis.set_ylabel("logistic loss")
    axis.legend(fontsize=7)
    return save(figure, path, title)

"""``kdzoo report --plot``: per dataset, grouped bars of the last primary metric (mean ± std over seeds) and
each row's curve over epochs (mean ± std band), from the complete runs of a report (kdzoo/report.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdzoo.plot import METRIC_LABELS, save_figure
from kdzoo.report import Collected, Row, build_tables, pair_label


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Epochs where every run was evaluated, the mean and the sample std (0 for one run) across runs."""
    length = min(len(c) for c in curves)
    epochs = [e for e in range(length) if all(c[e] is not None for c in curves)]
    values = np.array([[c[e] for e in epochs] for c in curves], dtype=np.float64)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(epochs))
    return [e + 1 for e in epochs], values.mean(axis=0), std


def _bar_groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Bar groups by teacher -> student pair; a student's teacherless rows (its vanilla baseline) join every
    pair of that student, or form their own group when the student has no pair."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.teacher is not None:
            groups.setdefault(pair_label(row), [])
    for label in groups:
        student = label.split("→")[-1]
        groups[label] = [r for r in rows if pair_label(r) == label or (r.teacher is None and r.student == student)]
    for row in rows:
        if row.teacher is None and not any(label.split("→")[-1] == row.student for label in groups):
            groups.setdefault(row.student, []).append(row)
    return groups


def plot_report(collected: Collected, output: str | Path) -> Path:
    """Per dataset: grouped bars of the last primary metric (mean ± std over seeds) per pair and method, and
    each row's curve over epochs (mean ± std band), from the complete runs."""
    tables = build_tables(collected.runs)
    figure = Figure(figsize=(12, 4.2 * len(tables)), constrained_layout=True)
    FigureCanvasAgg(figure)  # render with Agg: files only, no display
    axes = figure.subplots(len(tables), 2, squeeze=False)
    curves = {r.run_dir: r.curve for r in collected.runs if r.complete}
    for (bar_axis, curve_axis), table in zip(axes, tables, strict=True):
        groups = _bar_groups(table.rows)
        pairs = list(groups)
        methods = list(dict.fromkeys(r.method for r in table.rows))
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            bars = [(i, row) for i, rows in enumerate(groups.values()) for row in rows
                    if row.method == method and row.last_mean is not None]
            bar_axis.bar([i + (j - (len(methods) - 1) / 2) * width for i, _ in bars], [r.last_mean for _, r in bars],
                         width, yerr=[r.last_std or 0.0 for _, r in bars], capsize=3, label=method)
        ylabel, title = METRIC_LABELS.get(table.metric, (table.metric, table.metric))
        low = min((r.last_mean - (r.last_std or 0.0) for r in table.rows if r.last_mean is not None), default=0.0)
        bar_axis.set_xticks(range(len(pairs)), pairs)
        bar_axis.set(ylabel=ylabel, title=f"{table.dataset}: last {title}, mean ± std over seeds",
                     ylim=(max(0.0, math.floor(low - 5)), None))
        for row in table.rows:
            row_curves = [curves[d] for d in row.runs if d in curves]
            if not row_curves:
                continue
            epochs, mean, std = _mean_curve(row_curves)
            label = row.method if len(pairs) == 1 else f"{pair_label(row)} {row.method}"
            (line,) = curve_axis.plot(epochs, mean, marker="o", markersize=3, label=f"{label} (n={len(row_curves)})")
            curve_axis.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        curve_axis.set(xlabel="epoch", ylabel=ylabel, title=f"{table.dataset}: {title} per epoch")
        curve_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(figure, figure.axes, output)

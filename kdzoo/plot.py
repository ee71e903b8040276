"""``kdzoo plot``: training curves of one or more runs from their ``metrics.jsonl``, side by side —
top-1 per epoch and the summed training loss per epoch (matplotlib, written to an image file)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdzoo.errors import UserInputError


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a run directory, in order; a clear error for a missing or damaged file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserInputError(f"{run_dir} is not a kdzoo run directory: no metrics.jsonl in it")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path} line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise UserInputError(f"{path} line {number} is not an epoch record")
        records.append(record)
    if not records:
        raise UserInputError(f"{path} holds no epochs yet")
    return records


def _series(records: list[dict[str, Any]], metric: str = "top1") -> tuple[list[int], list[float | None], list[float]]:
    """x = epochs counted across stages (a multi-stage run's init epochs come first), the evaluation metric
    (None where evaluation was skipped) and the sum of the train/loss_* terms."""
    x = list(range(1, len(records) + 1))
    top1 = [r.get(metric) for r in records]
    loss = [sum(v for k, v in r.items() if k.startswith("train/loss_")) for r in records]
    return x, top1, loss


METRIC_LABELS = {"top1": ("test top-1 (%)", "accuracy"), "miou": ("validation mIoU (%)", "mean IoU")}


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None,
              metric: str = "top1") -> Path:
    """Evaluation ``metric`` (``top1``, ``miou``, any record key) and training loss per epoch of each run."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, same output everywhere
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(run_dirs):
        raise UserInputError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [(labels[i] if labels else Path(d).name, read_metrics(d)) for i, d in enumerate(run_dirs)]
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, records in runs:
        x, top1, loss = _series(records, metric)
        points = [(e, t) for e, t in zip(x, top1, strict=True) if t is not None]
        acc_axis.plot([e for e, _ in points], [t for _, t in points], marker="o", markersize=3, label=label)
        loss_axis.plot(x, loss, marker="o", markersize=3, label=label)
    ylabel, title = METRIC_LABELS.get(metric, (metric, metric))
    acc_axis.set(xlabel="epoch", ylabel=ylabel, title=title)
    loss_axis.set(xlabel="epoch", ylabel="sum of training loss terms", title="training loss", yscale="log")
    output = save_figure(figure, (acc_axis, loss_axis), output)
    plt.close(figure)
    return output


def save_figure(figure: Any, axes: Sequence[Any], output: str | Path) -> Path:
    """Grid and legend on every axis, then the figure to ``output`` (its folder created), at 120 dpi."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    return output

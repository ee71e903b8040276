"""``kdzoo report``: result tables of runs and sweeps, the way papers print them.

Every run directory holds ``config.yaml`` (what was trained) and ``metrics.jsonl`` (one record per epoch).
Runs are grouped by dataset (one table each) and by teacher -> student pair x method (one row each); a row
aggregates its seeds as mean ± sample standard deviation (n - 1) of the task's primary metric (top-1, mIoU,
box AP; :data:`kdzoo.engine.metrics.PRIMARY_METRIC`), next to the recipe's ``published`` value and the
gain over the same student trained with cross-entropy alone (method ``vanilla``). A run that did not reach
its final export (``student_last.pt``) is incomplete: it is listed under the table and never averaged in.
docs/sweeps.md shows an example.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdzoo.config.loader import read_yaml_mapping
from kdzoo.engine.metrics import PRIMARY_METRIC
from kdzoo.errors import UserInputError
from kdzoo.methods.registry import list_methods
from kdzoo.plot import METRIC_LABELS, _series, read_metrics
from kdzoo.types import CLASSIFICATION

MANIFEST = "manifest.json"  # a sweep directory's list of cells (kdzoo/sweep.py writes it)
FINAL_EXPORT = "student_last.pt"  # the trainer exports it after the last epoch of the last stage, and only then
BASELINE_METHOD = "vanilla"  # the student trained on its own loss alone (kdzoo/methods/vanilla.py)
REPORT_FORMATS = ("markdown", "csv", "latex", "json")


def run_complete(run_dir: str | Path) -> bool:
    """The run reached its end: the final export and its checksum exist and the last record is evaluated."""
    run_dir = Path(run_dir)
    export = run_dir / FINAL_EXPORT
    if not (export.is_file() and export.with_name(export.name + ".sha256").is_file()):
        return False
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return False
    config = _read_config(run_dir)
    metric = PRIMARY_METRIC.get(str(config.get("task", CLASSIFICATION)))
    return metric in read_metrics(run_dir)[-1]


@dataclass
class RunResult:
    """One run directory, read back."""

    run_dir: str
    dataset: str
    task: str
    metric: str
    teacher: str | None  # None for a method that learns without a teacher
    student: str
    method: str
    seed: int
    published: float | None
    complete: bool
    epochs: int  # epoch records written (all stages)
    last: float | None  # the primary metric of the last evaluated epoch
    best: float | None
    top5: float | None  # classification: top-5 of the last evaluated epoch
    wall_s: float  # sum of the epochs' epoch_time_s
    devices: int
    curve: list[float | None] = field(default_factory=list)  # the primary metric per epoch (None: not evaluated)


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserInputError(f"{run_dir} is not a kdzoo run directory: no config.yaml in it")
    return read_yaml_mapping(path, "run config")


def read_run(run_dir: str | Path, devices: int = 1) -> RunResult:
    """The metrics of one run directory; ``devices`` = accelerators the run used (for device-hours)."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    records = read_metrics(run_dir)
    task = str(config.get("task", CLASSIFICATION))
    if task not in PRIMARY_METRIC:
        raise UserInputError(f"{run_dir}/config.yaml names task {task!r}, not one of {sorted(PRIMARY_METRIC)}")
    metric = PRIMARY_METRIC[task]
    method = str((config.get("method") or {}).get("name", BASELINE_METHOD))
    method_cls = list_methods().get(method)
    uses_teacher = method_cls is None or method_cls.requires_teacher  # a method this version lacks: keep its teacher
    _, curve, _ = _series(records, metric)
    evaluated = [r for r in records if r.get(metric) is not None]
    published = (config.get("published") or {}).get(metric)
    return RunResult(
        run_dir=str(run_dir),
        dataset=str((config.get("data") or {}).get("dataset", "?")),
        task=task,
        metric=metric,
        teacher=(config.get("teacher") or {}).get("name") if uses_teacher else None,
        student=str((config.get("student") or {}).get("name", "?")),
        method=method,
        seed=int((config.get("experiment") or {}).get("seed", 0)),
        published=None if published is None else float(published),
        complete=run_complete(run_dir),
        epochs=len(records),
        last=float(evaluated[-1][metric]) if evaluated else None,
        best=max(float(r[metric]) for r in evaluated) if evaluated else None,
        top5=float(evaluated[-1]["top5"]) if task == CLASSIFICATION and evaluated and "top5" in evaluated[-1] else None,
        wall_s=float(sum(r.get("epoch_time_s", 0.0) for r in records)),
        devices=devices,
        curve=curve,
    )


@dataclass
class Collected:
    """What the paths given to ``kdzoo report`` hold: the runs, and the cells that have no records yet."""

    runs: list[RunResult]
    not_started: list[str]


def collect(paths: Sequence[str | Path]) -> Collected:
    """Run directories from a sweep directory (its manifest), a run directory (its metrics.jsonl) or any
    directory above runs (every metrics.jsonl below it)."""
    runs: list[RunResult] = []
    not_started: list[str] = []
    seen: set[Path] = set()

    def add(run_dir: Path, devices: int = 1) -> None:
        if run_dir.resolve() in seen:
            return
        seen.add(run_dir.resolve())
        if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0:
            runs.append(read_run(run_dir, devices))
        else:
            not_started.append(str(run_dir))

    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            try:
                cells = json.loads((path / MANIFEST).read_text())["cells"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserInputError(f"{path / MANIFEST} is not a kdzoo sweep manifest ({exc})") from None
            for cell in cells:
                add(Path(cell["run_dir"]), int(cell.get("devices", 1)))
        elif (path / "metrics.jsonl").is_file():
            add(path)
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("metrics.jsonl"))
            if not found:
                raise UserInputError(f"{path} holds no kdzoo runs (no manifest.json, no metrics.jsonl below it)")
            for run_dir in found:
                add(run_dir)
        else:
            raise UserInputError(f"{path} is not a directory (give a sweep or run directory)")
    return Collected(runs, not_started)


@dataclass
class Row:
    """One teacher -> student pair x method of a dataset's table; every number from its complete runs."""

    teacher: str | None
    student: str
    method: str
    n: int
    n_incomplete: int
    last_mean: float | None
    last_std: float | None
    best_mean: float | None
    best_std: float | None
    published: float | None
    delta_published: float | None  # last_mean - published
    gain_vs_vanilla: float | None  # last_mean - the same student's vanilla last_mean
    top5_mean: float | None
    top5_std: float | None
    wall_s_per_run: float | None  # mean over the runs of their summed epoch times
    device_hours: float  # sum over the runs of wall-clock x devices
    runs: list[str]


@dataclass
class Table:
    dataset: str
    task: str
    metric: str
    rows: list[Row]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def build_tables(runs: Sequence[RunResult]) -> list[Table]:
    """One table per dataset, rows in the order their pairs and methods first appear, vanilla first in a pair."""
    groups: dict[str, dict[tuple[str | None, str, str], list[RunResult]]] = {}
    for run in runs:
        groups.setdefault(run.dataset, {}).setdefault((run.teacher, run.student, run.method), []).append(run)
    tables = []
    for dataset, by_row in groups.items():
        rows = [_row(key, members) for key, members in by_row.items()]
        vanilla = {r.student: r.last_mean for r in rows if r.method == BASELINE_METHOD}
        for row in rows:
            base = vanilla.get(row.student)
            if row.method != BASELINE_METHOD and base is not None and row.last_mean is not None:
                row.gain_vs_vanilla = row.last_mean - base
        students = list(dict.fromkeys(r.student for r in rows))
        rows.sort(key=lambda r: (students.index(r.student), r.method != BASELINE_METHOD))
        first = next(iter(by_row.values()))[0]
        tables.append(Table(dataset, first.task, first.metric, rows))
    return tables


def _row(key: tuple[str | None, str, str], members: list[RunResult]) -> Row:
    teacher, student, method = key
    done = [r for r in members if r.complete]
    last_mean, last_std = mean_std([r.last for r in done if r.last is not None])
    best_mean, best_std = mean_std([r.best for r in done if r.best is not None])
    top5_mean, top5_std = mean_std([r.top5 for r in done if r.top5 is not None])
    published = next((r.published for r in members if r.published is not None), None)
    return Row(
        teacher=teacher, student=student, method=method, n=len(done), n_incomplete=len(members) - len(done),
        last_mean=last_mean, last_std=last_std, best_mean=best_mean, best_std=best_std, published=published,
        delta_published=None if published is None or last_mean is None else last_mean - published,
        gain_vs_vanilla=None, top5_mean=top5_mean, top5_std=top5_std,
        wall_s_per_run=float(np.mean([r.wall_s for r in done])) if done else None,
        device_hours=sum(r.wall_s * r.devices for r in done) / 3600.0,
        runs=[r.run_dir for r in members],
    )


# ---- text formats --------------------------------------------------------------------------------

def _pm(mean: float | None, std: float | None, pm: str) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f}{pm}{std:.2f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def pair_label(row: Row, arrow: str = "→") -> str:
    return row.student if row.teacher is None else f"{row.teacher}{arrow}{row.student}"


def _cells(table: Table, row: Row, pm: str, arrow: str) -> list[str]:
    cells = [pair_label(row, arrow), row.method, f"{row.n}*" if row.n_incomplete else str(row.n),
             _pm(row.last_mean, row.last_std, pm), _pm(row.best_mean, row.best_std, pm),
             "—" if row.published is None else f"{row.published:.2f}", _signed(row.delta_published),
             _signed(row.gain_vs_vanilla)]
    if table.task == CLASSIFICATION:
        cells.append(_pm(row.top5_mean, row.top5_std, pm))
    return [*cells, _duration(row.wall_s_per_run), f"{row.device_hours:.2f}"]


def _header(table: Table) -> list[str]:
    top5 = ["top-5"] if table.task == CLASSIFICATION else []
    return ["teacher → student", "method", "n", "last", "best", "published", "Δ published", "Δ vanilla", *top5,
            "time / run", "device-h"]


def _metric_title(table: Table) -> str:
    return f"{table.dataset} — {METRIC_LABELS.get(table.metric, (table.metric,))[0]}"


def _incomplete_lines(runs: Sequence[RunResult], not_started: Sequence[str]) -> list[str]:
    lines = [f"{r.run_dir}: {r.epochs} epoch record(s), no final export"
             + ("" if r.last is None else f" (last {r.metric} {r.last:.2f})") for r in runs if not r.complete]
    return lines + [f"{path}: not started" for path in not_started]


def format_markdown(tables: Sequence[Table], runs: Sequence[RunResult], not_started: Sequence[str]) -> str:
    out = []
    for table in tables:
        header = _header(table)
        out += [f"### {_metric_title(table)}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
        for row in table.rows:
            cells = _cells(table, row, " ± ", " → ")
            cells[2] = cells[2].replace("*", "\\*")  # a literal star, not emphasis
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    incomplete = _incomplete_lines(runs, not_started)
    if incomplete:
        out.append("\\* incomplete, not averaged:")
        out += [f"- {line}" for line in incomplete]
        out.append("")
    return "\n".join(out)


CSV_COLUMNS = ("dataset", "metric", "teacher", "student", "method", "n", "n_incomplete", "last_mean", "last_std",
               "best_mean", "best_std", "published", "delta_published", "gain_vs_vanilla", "top5_mean", "top5_std",
               "wall_s_per_run", "device_hours")


def format_csv(tables: Sequence[Table]) -> str:
    """One line per row, full-precision numbers, empty where a value does not exist."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for table in tables:
        for row in table.rows:
            values = {"dataset": table.dataset, "metric": table.metric, **asdict(row)}
            writer.writerow(["" if values[c] is None else values[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    for char in ("\\", "&", "%", "$", "#", "_", "{", "}"):
        text = text.replace(char, "\\textbackslash{}" if char == "\\" else f"\\{char}")
    return text.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}")


def format_latex(tables: Sequence[Table], runs: Sequence[RunResult], not_started: Sequence[str]) -> str:
    """booktabs tabulars (``\\usepackage{booktabs}``), one per dataset."""
    out = []
    for table in tables:
        header = [_latex_escape(h).replace("→", "$\\to$").replace("Δ", "$\\Delta$").replace("±", "$\\pm$")
                  for h in _header(table)]
        out += [f"% {_metric_title(table)}", "\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", "\\toprule",
                " & ".join(header) + " \\\\", "\\midrule"]
        for row in table.rows:
            cells = [_latex_escape(c).replace("±", "$\\pm$").replace("→", "$\\to$").replace("—", "--")
                     for c in _cells(table, row, "±", "→")]
            cells[2] = cells[2].replace("*", "$^*$")
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
    incomplete = _incomplete_lines(runs, not_started)
    if incomplete:
        out.append("$^*$ incomplete, not averaged: " + "; ".join(_latex_escape(line) for line in incomplete))
    return "\n".join(out)


def format_json(tables: Sequence[Table], runs: Sequence[RunResult], not_started: Sequence[str]) -> str:
    payload = {
        "tables": [asdict(t) for t in tables],
        "incomplete": [{"run_dir": r.run_dir, "epochs": r.epochs, "metric": r.metric, "last": r.last}
                       for r in runs if not r.complete],
        "not_started": list(not_started),
    }
    return json.dumps(payload, indent=2, allow_nan=False)


def render(collected: Collected, fmt: str = "markdown") -> str:
    if fmt not in REPORT_FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(REPORT_FORMATS)}")
    if not collected.runs:
        raise UserInputError("no run has written an epoch record yet: nothing to report")
    tables = build_tables(collected.runs)
    if fmt == "csv":
        return format_csv(tables)
    formatter = {"markdown": format_markdown, "latex": format_latex, "json": format_json}[fmt]
    return formatter(tables, collected.runs, collected.not_started)

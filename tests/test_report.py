"""``kdzoo report``: per-dataset tables of runs written the way the trainer writes them (config.yaml,
metrics.jsonl, student_last.pt); every number against numpy on the same records, every format parsed back,
incomplete runs listed and never averaged in."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdzoo.cli import main
from kdzoo.engine.checkpoint_io import save_checkpoint
from kdzoo.report import build_tables, collect, mean_std

CIFAR_LAST = {"vanilla": [73.1, 72.5, 73.6], "kd": [74.2, 74.9, 73.8], "dkd": [76.0, 76.4]}


def _run(root: Path, name: str, *, method: str, seed: int, scores: list[float], dataset: str = "cifar100",
         task: str = "classification", teacher: str | None = "resnet32x4", student: str = "resnet8x4",
         complete: bool = True, published: dict | None = None, epoch_time: float = 30.0) -> Path:
    """A run directory as the trainer leaves it: the primary metric per epoch, top-5 = metric + 20."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metric = {"classification": "top1", "segmentation": "miou", "detection": "map"}[task]
    config = {"task": task, "experiment": {"name": name, "seed": seed}, "data": {"dataset": dataset},
              "teacher": {"name": teacher}, "student": {"name": student}, "method": {"name": method},
              "published": {"top1": None, "miou": None, "map": None, **(published or {})}}
    (run_dir / "config.yaml").write_text("# kdzoo 0.1.0\n" + yaml.safe_dump(config))
    records = []
    for epoch, score in enumerate(scores, start=1):
        record = {"stage": "main", "epoch": epoch, "step": 10 * epoch, "lr": 0.05, "train/loss_ce": 1.0 / epoch,
                  "epoch_time_s": epoch_time, metric: score, "loss": 1.0}
        if task == "classification":
            record["top5"] = score + 20
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if complete:
        save_checkpoint({"format": "kdzoo-model", "metrics": records[-1]}, run_dir / "student_last.pt")
    return run_dir


def _cifar_runs(root: Path) -> None:
    for method, lasts in CIFAR_LAST.items():
        for seed, last in enumerate(lasts, start=1):
            # best is the middle epoch for seed 1, the last epoch otherwise
            scores = [last - 10, last + 0.5, last] if seed == 1 else [last - 10, last - 1, last]
            published = {"top1": 74.92 if method == "kd" else 76.32 if method == "dkd" else None}
            _run(root, f"{method}_s{seed}", method=method, seed=seed, scores=scores,
                 teacher=None if method == "vanilla" else "resnet32x4", published=published)
    # An unfinished KD seed: its 80.0 must not enter the mean.
    _run(root, "kd_s4_unfinished", method="kd", seed=4, scores=[60.0, 80.0], complete=False)


def _json_report(capsys, *paths: Path) -> dict:
    assert main(["report", *map(str, paths), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rows_are_mean_and_sample_std_over_complete_seeds(tmp_path, capsys):
    _cifar_runs(tmp_path)
    report = _json_report(capsys, tmp_path)
    (table,) = report["tables"]
    assert (table["dataset"], table["metric"]) == ("cifar100", "top1")
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["vanilla", "dkd", "kd"]  # the cross-entropy baseline first, then as found (sorted paths)
    for method, lasts in CIFAR_LAST.items():
        row = rows[method]
        bests = [lasts[0] + 0.5, *lasts[1:]]
        assert row["n"] == len(lasts)
        assert row["last_mean"] == pytest.approx(np.mean(lasts), abs=1e-12)
        assert row["last_std"] == pytest.approx(np.std(lasts, ddof=1), abs=1e-12)
        assert row["best_mean"] == pytest.approx(np.mean(bests), abs=1e-12)
        assert row["best_std"] == pytest.approx(np.std(bests, ddof=1), abs=1e-12)
        assert row["top5_mean"] == pytest.approx(np.mean(lasts) + 20, abs=1e-12)
        assert row["wall_s_per_run"] == pytest.approx(90.0)
        assert row["device_hours"] == pytest.approx(len(lasts) * 90.0 / 3600)
    assert rows["kd"]["n_incomplete"] == 1 and rows["kd"]["teacher"] == "resnet32x4"
    assert rows["vanilla"]["teacher"] is None and rows["vanilla"]["published"] is None
    assert rows["kd"]["delta_published"] == pytest.approx(np.mean(CIFAR_LAST["kd"]) - 74.92, abs=1e-12)
    assert rows["dkd"]["gain_vs_vanilla"] == pytest.approx(np.mean(CIFAR_LAST["dkd"]) - np.mean(CIFAR_LAST["vanilla"]),
                                                           abs=1e-12)
    assert rows["vanilla"]["gain_vs_vanilla"] is None
    assert report["incomplete"] == [{"run_dir": str(tmp_path / "kd_s4_unfinished"), "epochs": 2, "metric": "top1",
                                     "last": 80.0}]


def test_markdown_marks_incomplete_rows_and_lists_them(tmp_path, capsys):
    _cifar_runs(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    markdown = capsys.readouterr().out
    kd = CIFAR_LAST["kd"]
    assert markdown.startswith("### cifar100 — test top-1 (%)\n")
    assert (f"| resnet32x4 → resnet8x4 | kd | 3\\* | {np.mean(kd):.2f} ± {np.std(kd, ddof=1):.2f} |" in markdown)
    assert "| resnet8x4 | vanilla | 3 |" in markdown
    assert f"| 74.92 | {np.mean(kd) - 74.92:+.2f} | {np.mean(kd) - np.mean(CIFAR_LAST['vanilla']):+.2f} |" in markdown
    assert "| 1m30s | 0.07 |" in markdown  # 3 x 90 s = 0.075 device-hours
    assert f"- {tmp_path / 'kd_s4_unfinished'}: 2 epoch record(s), no final export (last top1 80.00)" in markdown


def test_csv_and_latex_parse_back(tmp_path, capsys):
    _cifar_runs(tmp_path)
    expected = {r["method"]: r for r in _json_report(capsys, tmp_path)["tables"][0]["rows"]}
    assert main(["report", str(tmp_path), "--format", "csv", "--output", str(tmp_path / "out" / "t.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "t.csv").read_text())))
    assert [r["method"] for r in rows] == ["vanilla", "dkd", "kd"]
    for row in rows:
        want = expected[row["method"]]
        for column in ("last_mean", "last_std", "best_mean", "top5_mean", "device_hours"):
            assert float(row[column]) == want[column]
        assert row["teacher"] == (want["teacher"] or "") and int(row["n_incomplete"]) == want["n_incomplete"]
    assert rows[0]["gain_vs_vanilla"] == "" and rows[0]["published"] == ""

    capsys.readouterr()
    assert main(["report", str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    lines = latex.splitlines()
    body = lines[lines.index("\\midrule") + 1 : lines.index("\\bottomrule")]
    assert lines[1].startswith("\\begin{tabular}{ll") and "\\toprule" in lines and "\\end{tabular}" in lines
    assert all(line.endswith(" \\\\") and line.count(" & ") == 10 for line in body)
    kd = CIFAR_LAST["kd"]
    assert body[2].startswith(f"resnet32x4$\\to$resnet8x4 & kd & 3$^*$ & {np.mean(kd):.2f}$\\pm$"
                              f"{np.std(kd, ddof=1):.2f} & ")
    assert "kd\\_s4\\_unfinished" in latex  # the footnote, escaped


def test_segmentation_and_detection_tables_use_their_primary_metric(tmp_path, capsys):
    for seed, miou in enumerate([70.0, 72.0], start=1):
        _run(tmp_path / "seg", f"cwd_{seed}", method="cwd", seed=seed, scores=[60.0, miou], dataset="voc",
             task="segmentation", teacher="deeplabv3plus_resnet101", student="deeplabv3plus_resnet18",
             published={"miou": 75.9})
    _run(tmp_path / "det", "ce", method="vanilla", seed=0, scores=[30.0, 35.5], dataset="coco", task="detection",
         teacher=None, student="fasterrcnn_resnet18_fpn")
    report = _json_report(capsys, tmp_path / "seg", tmp_path / "det")
    seg, det = report["tables"]
    assert (seg["dataset"], seg["metric"], det["dataset"], det["metric"]) == ("voc", "miou", "coco", "map")
    assert seg["rows"][0]["last_mean"] == pytest.approx(71.0) and seg["rows"][0]["last_std"] == pytest.approx(
        np.std([70.0, 72.0], ddof=1))
    assert seg["rows"][0]["delta_published"] == pytest.approx(71.0 - 75.9) and seg["rows"][0]["top5_mean"] is None
    assert det["rows"][0]["n"] == 1 and det["rows"][0]["last_std"] is None  # one seed: no spread
    assert main(["report", str(tmp_path / "seg"), str(tmp_path / "det")]) == 0
    markdown = capsys.readouterr().out
    assert "### voc — validation mIoU (%)" in markdown and "### coco — map" in markdown
    assert "top-5" not in markdown
    assert "| fasterrcnn_resnet18_fpn | vanilla | 1 | 35.50 | 35.50 |" in markdown


def test_a_sweep_manifest_lists_cells_that_never_started(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = _run(sweep, "method-kd_seed-1", method="kd", seed=1, scores=[50.0, 60.0])
    (sweep / "manifest.json").write_text(json.dumps({"cells": [
        {"name": "method-kd_seed-1", "run_dir": str(done), "devices": 4},
        {"name": "method-kd_seed-2", "run_dir": str(sweep / "method-kd_seed-2"), "devices": 4},
    ]}))
    report = _json_report(capsys, sweep)
    assert report["not_started"] == [str(sweep / "method-kd_seed-2")]
    assert report["tables"][0]["rows"][0]["device_hours"] == pytest.approx(4 * 60.0 / 3600)


def test_plot_draws_bars_and_curves(tmp_path, capsys):
    _cifar_runs(tmp_path / "runs")
    _run(tmp_path / "runs", "seg", method="vanilla", seed=0, scores=[40.0, 50.0], dataset="voc", task="segmentation",
         teacher=None, student="deeplabv3plus_resnet18")
    assert main(["report", str(tmp_path / "runs"), "--plot", str(tmp_path / "fig" / "sweep.png")]) == 0
    assert f"figure written to {tmp_path / 'fig' / 'sweep.png'}" in capsys.readouterr().out
    image = (tmp_path / "fig" / "sweep.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 10_000


def test_mean_std_and_row_grouping_edge_cases(tmp_path):
    assert mean_std([]) == (None, None) and mean_std([2.0]) == (2.0, None)
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)))
    # Two teachers for one student: two kd rows, one shared vanilla baseline for both gains.
    _run(tmp_path, "ce", method="vanilla", seed=0, scores=[70.0], teacher=None)
    _run(tmp_path, "kd_a", method="kd", seed=0, scores=[72.0], teacher="resnet56")
    _run(tmp_path, "kd_b", method="kd", seed=0, scores=[73.5], teacher="resnet110")
    (table,) = build_tables(collect([tmp_path]).runs)
    assert [(r.teacher, r.method, r.gain_vs_vanilla) for r in table.rows] == [
        (None, "vanilla", None), ("resnet56", "kd", pytest.approx(2.0)), ("resnet110", "kd", pytest.approx(3.5))]


def test_nothing_to_report_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no kdzoo runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err

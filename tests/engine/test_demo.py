"""``kdzoo demo`` end to end on a shortened budget: four runs through ``kdzoo train``, their curves."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdzoo.demo import run_demo, run_detection_demo, run_segmentation_demo
from kdzoo.plot import read_metrics


# Four trainings in this process, with no deadline of their own: ~10 min on a 2-core machine that runs two
# other busy processes, too close to the project-wide 900 s. The limit only catches a hang.
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_trains_teacher_and_three_students_and_plots_them(tmp_path, capsys):
    rows = run_demo(str(tmp_path), epochs=1, teacher_epochs=1)
    assert [r["run"] for r in rows] == ["teacher resnet20", "student resnet8", "KD resnet8", "DKD resnet8"]
    for row in rows:
        records = read_metrics(row["run_dir"])
        assert len(records) == 1 and row["last"] == records[0]["top1"]
        assert 10.0 < row["last"] <= 100.0  # one epoch on 4,000 digits is far above chance (10 %)
    kd_terms = set(read_metrics(rows[2]["run_dir"])[0])
    assert {"train/loss_ce", "train/loss_kd"} <= kd_terms
    out = capsys.readouterr().out
    curves = Path(out.split("curves: ")[1].split()[0])
    assert curves.parent.parent == tmp_path and curves.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_segmentation_demo_trains_on_the_real_nuclei_masks(tmp_path, capsys):
    rows = run_segmentation_demo(str(tmp_path / "runs"), epochs=1, teacher_epochs=1, data_root=str(tmp_path))
    assert [r["run"] for r in rows] == ["teacher R18", "student MV2", "OFD MV2", "CWD MV2"]
    assert (tmp_path / "nuclei-voc" / "ImageSets" / "Segmentation" / "val.txt").is_file()  # the VOC layout
    for row in rows:
        records = read_metrics(row["run_dir"])
        assert row["metric"] == "miou" and len(records) == 1 and row["last"] == records[0]["miou"]
        assert 0.0 < row["last"] <= 100.0 and {"iou/0", "pixel_acc"} <= set(records[0])
    assert {"train/loss_ce", "train/loss_ofd"} <= set(read_metrics(rows[2]["run_dir"])[0])
    assert {"train/loss_ce", "train/loss_cwd"} <= set(read_metrics(rows[3]["run_dir"])[0])
    out = capsys.readouterr().out
    assert "last mIoU" in out and Path(out.split("curves: ")[1].split()[0]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_detection_demo_trains_on_the_real_tree_crowns(tmp_path, capsys):
    """Teacher 6 iterations (an epoch of 9 batches, cut at 6), students 4: one truncated epoch each, evaluated."""
    pytest.importorskip("pycocotools")
    rows = run_detection_demo(str(tmp_path / "runs"), iterations=4, teacher_iterations=6, data_root=str(tmp_path))
    assert [r["run"] for r in rows] == ["teacher R18", "student MV2", "ReviewKD MV2"]
    assert (tmp_path / "trees-voc" / "ImageSets" / "Main" / "val.txt").is_file()  # the VOC XML layout
    for row, steps in zip(rows, (6, 4, 4)):
        records = read_metrics(row["run_dir"])
        assert row["metric"] == "map" and [r["step"] for r in records] == [steps]
        assert row["last"] == records[0]["map"] and 0.0 <= row["last"] <= 100.0 and "map50" in records[0]
    assert {"train/loss_classifier", "train/loss_reviewkd"} <= set(read_metrics(rows[2]["run_dir"])[0])
    out = capsys.readouterr().out
    assert "last mAP" in out and Path(out.split("curves: ")[1].split()[0]).read_bytes()[:4] == b"\x89PNG"

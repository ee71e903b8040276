"""The exact teacher cache: built once, verified against the live teacher, and a KD run with it
matches a run without it within fp16 rounding of the teacher's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.cli import main
from kdzoo.config.loader import config_from_dict
from kdzoo.engine.run import run_training
from kdzoo.errors import UserInputError


def _raw(tmp_path: Path, name: str, cache: str | None, method: str = "kd") -> dict:
    teacher = tmp_path / "teacher.pth"
    if not teacher.exists():
        torch.manual_seed(1)
        torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, teacher)
    return {
        "experiment": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 2},
        "data": {"dataset": "mnist5k", "batch_size": 16, "subset": 48, "test_subset": 32},
        "teacher": {"name": "resnet8", "checkpoint": str(teacher), "cache": cache},
        "student": {"name": "resnet8"}, "method": {"name": method},
        "schedule": {"epochs": 2, "milestones": [1]},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "deterministic": True},
    }


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(raw))  # JSON is valid YAML
    return path


def test_cache_build_verify_and_training_match(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    config = _write_config(tmp_path, _raw(tmp_path, "x", str(cache_dir)))
    assert main(["cache", "build", str(config), "runtime.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "largest difference" in out
    worst = float(out.split("largest difference ")[1].split()[0])
    assert worst <= 1.0  # the stored value is the live logit rounded to fp16
    table = __import__("numpy").load(cache_dir / "logits.npy", mmap_mode="r")
    assert table.shape == (48, 5, 5, 1, 10)  # mnist5k: padding 2 -> 5x5 offsets, no flips

    live = run_training(config_from_dict(_raw(tmp_path, "live", None)))
    cached = run_training(config_from_dict(_raw(tmp_path, "cached", str(cache_dir))))
    rec_live = [json.loads(x) for x in (Path(live["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rec_cached = [json.loads(x) for x in (Path(cached["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rec_live, rec_cached):
        assert b["train/loss_kd"] == pytest.approx(a["train/loss_kd"], rel=2e-3)
        assert b["train/loss_ce"] == pytest.approx(a["train/loss_ce"], rel=2e-3)


def test_cache_for_another_teacher_is_refused(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    raw = _raw(tmp_path, "x", str(cache_dir))
    assert main(["cache", "build", str(_write_config(tmp_path, raw)), "runtime.progress=false"]) == 0
    other = tmp_path / "other.pth"
    torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, other)
    raw["teacher"]["checkpoint"] = str(other)
    with pytest.raises(UserInputError, match="teacher_sha256"):
        run_training(config_from_dict(raw))
    assert not (tmp_path / "runs" / "x").exists()


def test_feature_methods_fall_back_to_the_live_teacher(tmp_path):
    cache_dir = tmp_path / "cache"
    raw = _raw(tmp_path, "fit", str(cache_dir), method="fitnet")
    raw["schedule"]["epochs"] = 1
    with pytest.warns(UserWarning, match="teacher.cache is ignored"):
        run_training(config_from_dict(raw))

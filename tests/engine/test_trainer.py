"""End-to-end training on small real data: metrics, exports, exact resume, guarded steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.config.loader import config_from_dict
from kdzoo.engine import checkpoint_io
from kdzoo.engine.run import run_training
from kdzoo.engine.trainer import NonFiniteLossError
from kdzoo.errors import UserInputError


def _teacher_file(tmp_path: Path) -> str:
    torch.manual_seed(123)
    teacher = kdzoo.create_model("resnet8", num_classes=10)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 240}, path)  # RepDistiller's format
    return str(path)


def _cfg(tmp_path: Path, name: str, method: dict, epochs: int = 2, **runtime) -> object:
    raw = {
        "experiment": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 7},
        "data": {"dataset": "mnist5k", "batch_size": 32, "subset": 192, "test_subset": 96, "test_batch_size": 48},
        "student": {"name": "resnet8"},
        "method": method,
        "schedule": {"epochs": epochs, "milestones": [1]},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "deterministic": True,
                    "log_interval": 2, **runtime},
    }
    if method["name"] != "vanilla":
        raw["teacher"] = {"name": "resnet8", "checkpoint": _teacher_file(tmp_path)}
    return config_from_dict(raw)


def _student_weights(run_dir: str, file: str = "student_last.pt") -> dict[str, torch.Tensor]:
    return checkpoint_io.load_verified(Path(run_dir) / file)["model"]


def _records(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``, one JSON object a line."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _metrics(run_dir: str | Path) -> list[dict]:
    """The records without ``epoch_time_s``: wall-clock time is the one field that legitimately differs between
    runs."""
    records = _records(run_dir)
    for record in records:
        assert record.pop("epoch_time_s") >= 0
    return records


@pytest.mark.parametrize("method", ["kd", "dot"])
def test_fp16_autocast_trains_through_the_grad_scaler(tmp_path, method):
    """fp16 runs scale the loss (CPU autocast and GradScaler here, CUDA's in practice): same epoch losses
    as fp32 within fp16 precision, and the scaler's state is checkpointed for exact resume."""
    optim = {"name": "dot"} if method == "dot" else {}
    losses = {}
    for amp in (False, True):
        cfg = _cfg(tmp_path / str(amp), method, {"name": "kd"}, epochs=1, amp=amp, amp_dtype="fp16")
        if optim:
            cfg.optim.name = "dot"
        summary = run_training(cfg)
        record = _records(summary["run_dir"])[-1]
        losses[amp] = (record["train/loss_ce"], record["train/loss_kd"])
        state = checkpoint_io.load_verified(checkpoint_io.list_checkpoints(Path(summary["run_dir"]))[-1].path)["scaler"]
        assert (state.get("scale", 0.0) > 1.0) == amp  # enabled only under fp16 (initial scale 2^16)
    for fp32, fp16 in zip(losses[False], losses[True], strict=True):
        assert fp16 == pytest.approx(fp32, rel=2e-2)


def test_kd_run_records_metrics_and_exports(tmp_path):
    summary = run_training(_cfg(tmp_path, "kd", {"name": "kd"}))
    run_dir = Path(summary["run_dir"])
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.005])  # decay after milestone epoch 1
    assert {"train/loss_ce", "train/loss_kd", "top1", "top5", "loss"} <= set(records[0])
    assert summary["last"] == records[-1]["top1"]
    assert summary["best"] == max(r["top1"] for r in records)
    assert (run_dir / "config.yaml").read_text().startswith("# kdzoo")
    student = kdzoo.create_model("resnet8", num_classes=10)
    student.load_state_dict(_student_weights(summary["run_dir"]))  # export loads into a bare model


@pytest.mark.parametrize("kill_at", [3, 6, 9])
def test_resume_is_bit_exact(tmp_path, monkeypatch, kill_at):
    """Stop after ``kill_at`` steps (mid-epoch, at an epoch boundary, late), resume, compare."""
    reference = run_training(_cfg(tmp_path / "a", "r", {"name": "kd"}, checkpoint_interval=3))

    cfg = _cfg(tmp_path / "b", "r", {"name": "kd"}, checkpoint_interval=3)
    from kdzoo.engine import trainer as trainer_module

    original = trainer_module.Trainer.train_step
    calls = {"n": 0}

    def crashing_step(self, batch, progress):
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return original(self, batch, progress)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(trainer_module.Trainer, "train_step", crashing_step)
        run_training(cfg)
    resumed = run_training(cfg, resume="auto")
    for name, value in _student_weights(reference["run_dir"]).items():
        assert torch.equal(value, _student_weights(resumed["run_dir"])[name]), name
    assert _metrics(reference["run_dir"]) == _metrics(resumed["run_dir"])


def test_existing_run_needs_resume_and_corrupt_checkpoint_falls_back(tmp_path):
    cfg = _cfg(tmp_path, "c", {"name": "vanilla"}, epochs=2)
    summary = run_training(cfg)
    with pytest.raises(UserInputError, match="already holds checkpoints"):
        run_training(cfg)
    refs = checkpoint_io.list_checkpoints(Path(summary["run_dir"]))
    newest = refs[-1].path
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash or a bad copy
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert checkpoint_io.newest_valid(Path(summary["run_dir"])).path == refs[-2].path
    with pytest.raises(UserInputError, match="checksum mismatch"):
        run_training(cfg, resume=str(newest))


def test_nonfinite_loss_stops_with_named_term(tmp_path):
    cfg = _cfg(tmp_path, "nan", {"name": "vanilla"}, epochs=1)
    cfg.optim.lr = 1e30  # diverges within a few steps
    with pytest.raises(NonFiniteLossError, match=r"loss_ce.*epoch 1"):
        run_training(cfg)


def test_teacher_that_changes_is_caught(tmp_path, monkeypatch):
    from kdzoo.engine.trainer import TeacherChangedError
    from kdzoo.methods.kd import KD

    original = KD.compute_losses

    def tampering(self, student, teacher, batch, progress):
        with torch.no_grad():
            self.teacher.fc.bias.add_(1e-3)  # a method bug that writes into the teacher
        return original(self, student, teacher, batch, progress)

    monkeypatch.setattr(KD, "compute_losses", tampering)
    with pytest.raises(TeacherChangedError, match=r"fc.bias"):
        run_training(_cfg(tmp_path, "tamper", {"name": "kd"}, epochs=1))
    assert not checkpoint_io.list_checkpoints(tmp_path / "runs" / "tamper")


def test_nonfinite_skip_mode_skips_the_bad_step_and_finishes(tmp_path, monkeypatch):
    from kdzoo.methods.kd import KD

    original = KD.compute_losses
    calls = {"n": 0}

    def poisoned(self, student, teacher, batch, progress):
        losses = original(self, student, teacher, batch, progress)
        calls["n"] += 1
        if calls["n"] == 2:  # one NaN step in the middle of the epoch
            losses["loss_kd"] = losses["loss_kd"] * float("nan")
        return losses

    monkeypatch.setattr(KD, "compute_losses", poisoned)
    summary = run_training(_cfg(tmp_path, "skip", {"name": "kd"}, epochs=1, nonfinite="skip"))
    weights = _student_weights(summary["run_dir"])
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert summary["last"] is not None


class _FakeWandb:
    """Stands in for the ``wandb`` package: records what the trainer sends it."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logs.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_is_opt_in_and_gets_every_epoch_record(tmp_path, monkeypatch):
    import importlib.util
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else
                        real_find_spec(name, *a))
    summary = run_training(_cfg(tmp_path, "wb", {"name": "kd"}, wandb=True, wandb_project="proj"))
    run_dir = Path(summary["run_dir"])
    (init,) = fake.inits
    run_id = (run_dir / "wandb_id").read_text()
    assert init["project"] == "proj" and init["id"] == run_id and init["resume"] == "allow"
    assert init["config"]["method"] == {"name": "kd"} and init["config"]["runtime"]["wandb"] is True
    records = _records(run_dir)
    assert [step for step, _ in fake.logs] == [r["step"] for r in records] == [6, 12]
    for (_, sent), record in zip(fake.logs, records, strict=True):
        assert sent["top1"] == record["top1"] and sent["train/loss_kd"] == record["train/loss_kd"]
        assert sent["epoch"] == record["epoch"]
    assert fake.finished == 1
    # A resumed run continues the same W&B run.
    run_training(_cfg(tmp_path, "wb", {"name": "kd"}, epochs=3, wandb=True), resume="auto")
    assert fake.inits[1]["id"] == run_id and [s for s, _ in fake.logs[2:]] == [18]
    # Off by default: nothing is sent.
    run_training(_cfg(tmp_path, "plain", {"name": "kd"}, epochs=1))
    assert len(fake.inits) == 2


def test_wandb_without_the_package_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(UserInputError, match=r"pip install 'kdzoo\[wandb\]'"):
        run_training(_cfg(tmp_path, "wb", {"name": "kd"}, wandb=True))
    assert not (tmp_path / "runs" / "wb").exists()

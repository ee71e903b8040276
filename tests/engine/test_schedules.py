"""Learning-rate schedules: epoch milestones (RepDistiller), per-step poly (pytorch-deeplab-xception), and the
detection convention — iteration-counted step decay with linear warm-up (Detectron2's WarmupMultiStepLR) and the
linear scaling rule — through the trainer, with an exact resume inside the truncated last epoch."""

from __future__ import annotations

import bisect
import dataclasses

import pytest
import torch

from kdzoo.config.loader import config_from_dict
from kdzoo.config.schema import ScheduleConfig
from kdzoo.engine import trainer as trainer_module
from kdzoo.engine.optim import scaled_to_batch, scheduled_lr, warmup_factor
from kdzoo.engine.run import run_training
from kdzoo.errors import UserInputError
from tests.engine.test_trainer import _metrics, _records, _student_weights

DETECTRON2_1X = ScheduleConfig(unit="iterations", iterations=180_000, milestones=[120_000, 160_000],
                               warmup_iters=1000, warmup_factor=0.001)


def _detectron2_lr(base_lr: float, it: int, schedule: ScheduleConfig) -> float:
    """Detectron2's (pre-fvcore) WarmupMultiStepLR.get_lr restated: the linear warm-up factor times
    gamma ** bisect_right(milestones, it)."""
    if it >= schedule.warmup_iters:
        factor = 1.0
    else:
        alpha = it / schedule.warmup_iters
        factor = schedule.warmup_factor * (1 - alpha) + alpha
    return base_lr * factor * schedule.gamma ** bisect.bisect_right(schedule.milestones, it)


@pytest.mark.parametrize("step", [0, 1, 500, 999, 1000, 1001, 119_999, 120_000, 159_999, 160_000, 179_999])
def test_iteration_schedule_equals_detectron2(step):
    got = scheduled_lr(0.01, DETECTRON2_1X, epoch=1, step=step, total_steps=180_000)
    assert got == pytest.approx(_detectron2_lr(0.01, step, DETECTRON2_1X), rel=1e-12)


def test_warmup_values_and_epoch_unit_ignores_step_milestones():
    assert warmup_factor(0, DETECTRON2_1X) == pytest.approx(0.001)
    assert warmup_factor(500, DETECTRON2_1X) == pytest.approx(0.5005)
    assert warmup_factor(1000, DETECTRON2_1X) == 1.0
    epochs = ScheduleConfig(milestones=[150, 180, 210])
    assert scheduled_lr(0.05, epochs, epoch=151, step=3, total_steps=10) == pytest.approx(0.005)
    assert scheduled_lr(0.05, epochs, epoch=150, step=10**6, total_steps=10) == pytest.approx(0.05)


def test_linear_scaling_rule_keeps_the_images_seen():
    """A 16-image reference run on 8 images per step: half the lr, twice the steps (Detectron2's
    auto_scale_workers); with unit=epochs only the lr moves; without a reference batch nothing does."""
    reference = dataclasses.replace(DETECTRON2_1X, reference_batch=16)
    scaled, lr = scaled_to_batch(reference, 0.02, 8)
    assert lr == pytest.approx(0.01)
    assert (scaled.iterations, scaled.milestones, scaled.warmup_iters) == (360_000, [240_000, 320_000], 2000)
    by_epoch, lr = scaled_to_batch(ScheduleConfig(reference_batch=256), 0.1, 512)
    assert lr == pytest.approx(0.2) and by_epoch.epochs == 240
    assert scaled_to_batch(DETECTRON2_1X, 0.01, 64) == (DETECTRON2_1X, 0.01)


def _iteration_cfg(tmp_path, **schedule):
    """mnist5k, 192 images in batches of 32: 6 steps an epoch; 8 iterations = one epoch and two steps."""
    return config_from_dict({
        "experiment": {"name": "it", "output_dir": str(tmp_path / "runs"), "seed": 5},
        "data": {"dataset": "mnist5k", "batch_size": 32, "subset": 192, "test_subset": 64, "test_batch_size": 64},
        "student": {"name": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"lr": 0.04},
        "schedule": {"unit": "iterations", "iterations": 8, "milestones": [7], "warmup_iters": 4,
                     "warmup_factor": 0.25, "reference_batch": 16, **schedule},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "deterministic": True,
                    "log_interval": 1, "checkpoint_interval": 1},
    })


def test_iteration_run_scaled_to_the_batch_stops_at_its_step_count(tmp_path):
    """Global batch 32 against the reference 16: lr 0.08, 4 iterations, decay from 0-based step 6/2 = 3, warm-up
    over 2 steps. The 4 steps fit in the first epoch (6 batches), so the run is one truncated epoch."""
    summary = run_training(_iteration_cfg(tmp_path / "a", milestones=[6]))
    records = _records(summary["run_dir"])
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4)]
    assert records[0]["lr"] == pytest.approx(0.08 * 0.1)  # the record holds the last step's lr
    assert summary["last"] == records[0]["top1"]


def test_iteration_count_spanning_epochs_and_a_kill_inside_the_last_one(tmp_path, monkeypatch):
    """No scaling (reference = global batch): 8 steps = a full epoch of 6 and a last epoch of 2; lr per step
    follows the schedule; killed after 7 steps, the resumed run equals the uninterrupted one bit for bit."""
    reference = run_training(_iteration_cfg(tmp_path / "a", reference_batch=32))
    records = _records(reference["run_dir"])
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6), (2, 8)]
    assert [r["lr"] for r in records] == pytest.approx([0.04, 0.004])  # steps 5 and 7 (decay from step 7 on)

    seen_lrs: list[float] = []
    original = trainer_module.Trainer.train_step

    def recording_step(self, batch, progress):
        if len(seen_lrs) == 7:
            raise KeyboardInterrupt("simulated crash")
        seen_lrs.append(self.optimizer.param_groups[0]["lr"])
        return original(self, batch, progress)

    cfg = _iteration_cfg(tmp_path / "b", reference_batch=32)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(trainer_module.Trainer, "train_step", recording_step)
        run_training(cfg)
    expected = [_detectron2_lr(0.04, it, cfg.schedule) for it in range(7)]
    assert seen_lrs == pytest.approx(expected)
    assert seen_lrs[0] == pytest.approx(0.01)  # warm-up from 0.25 x lr
    resumed = run_training(cfg, resume="auto")
    for name, value in _student_weights(reference["run_dir"]).items():
        assert torch.equal(value, _student_weights(resumed["run_dir"])[name]), name
    assert _metrics(reference["run_dir"]) == _metrics(resumed["run_dir"])


@pytest.mark.parametrize(("schedule", "message"), [
    ({"iterations": None}, "schedule.unit=iterations needs schedule.iterations"),
    ({"unit": "iters"}, "schedule.unit must be epochs or iterations"),
    ({"warmup_factor": 0.0}, "schedule.warmup_factor must be in (0, 1]"),
    ({"reference_batch": 0}, "schedule.reference_batch must be positive"),
])
def test_bad_schedules_are_user_errors(tmp_path, schedule, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _iteration_cfg(tmp_path, **schedule)

"""Optimisers and the step-wise learning-rate schedule of the KD recipes."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kdzoo.config.schema import OptimConfig, ScheduleConfig
from kdzoo.engine.dot import DistillationOrientedSGD


def build_optimizer(
    param_groups: list[dict[str, Any]], cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.name == "dot":
        return DistillationOrientedSGD(
            param_groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, delta=cfg.dot_delta
        )
    return torch.optim.SGD(
        param_groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def multistep_lr(base_lr: float, epoch: int, schedule: ScheduleConfig) -> float:
    """RepDistiller's ``adjust_learning_rate``: with 1-based epoch e, lr = base * gamma^#{m < e}, so the
    first decay of milestones 150/180/210 applies from epoch 151 (docs/config.md)."""
    decays = sum(epoch > m for m in schedule.milestones)
    return base_lr * schedule.gamma**decays


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """pytorch-deeplab-xception ``utils/lr_scheduler.py`` mode 'poly': base * (1 - T/N)^power with T the 0-based
    iteration over the whole run and N its iteration count."""
    return base_lr * max(1.0 - step / max(total_steps, 1), 0.0) ** power


def warmup_factor(step: int, schedule: ScheduleConfig) -> float:
    """Detectron2 ``solver/lr_scheduler.py`` linear warm-up: at 0-based step t < W the lr is multiplied by
    f (1 - t/W) + t/W, f = ``warmup_factor``; 1 from step W on."""
    if step >= schedule.warmup_iters:
        return 1.0
    alpha = step / schedule.warmup_iters
    return schedule.warmup_factor * (1.0 - alpha) + alpha


def schedule_epochs(schedule: ScheduleConfig, batches_per_epoch: int) -> int:
    """The epochs a schedule trains: ``epochs``, or with unit=iterations the epochs its steps reach (the last one
    cut short)."""
    if schedule.unit == "iterations":
        return -(-int(schedule.iterations or 0) // max(batches_per_epoch, 1))
    return schedule.epochs


def scheduled_lr(base_lr: float, schedule: ScheduleConfig, *, epoch: int, step: int, total_steps: int) -> float:
    """The lr of ``schedule`` at 1-based ``epoch`` of the stage and 0-based global ``step``: poly per step;
    multistep per epoch (unit=epochs) or per step (unit=iterations, Detectron2's WarmupMultiStepLR:
    base * gamma^#{m <= step}); times the linear warm-up factor."""
    if schedule.name == "poly":
        lr = poly_lr(base_lr, step, total_steps, schedule.power)
    elif schedule.unit == "iterations":
        lr = base_lr * schedule.gamma ** sum(step >= m for m in schedule.milestones)
    else:
        lr = multistep_lr(base_lr, epoch, schedule)
    return lr * warmup_factor(step, schedule)


def scaled_to_batch(schedule: ScheduleConfig, lr: float, global_batch: int) -> tuple[ScheduleConfig, float]:
    """The schedule and base lr a run with ``global_batch`` images per step uses, by the linear scaling rule
    (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; Detectron2's ``DefaultTrainer.auto_scale_workers``):
    lr x k with k = global_batch / ``reference_batch``, and with unit=iterations the step counts (iterations,
    milestones, warm-up) / k, rounded, so the run sees the same images. No ``reference_batch``: unchanged."""
    if schedule.reference_batch is None or global_batch == schedule.reference_batch:
        return schedule, lr
    k = global_batch / schedule.reference_batch
    if schedule.unit != "iterations":
        return schedule, lr * k
    scaled = dataclasses.replace(
        schedule,
        iterations=max(1, round(schedule.iterations / k)),
        milestones=[round(m / k) for m in schedule.milestones],
        warmup_iters=round(schedule.warmup_iters / k),
    )
    return scaled, lr * k


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets ``lr`` times its ``lr_scale`` (1 unless the trainer scaled it: head / extra modules)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

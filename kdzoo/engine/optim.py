"""Optimisers and the step-wise learning-rate schedule of the KD recipes."""

from __future__ import annotations

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


def scheduled_lr(base_lr: float, schedule: ScheduleConfig, *, epoch: int, step: int, total_steps: int) -> float:
    """The lr of ``schedule`` at 1-based ``epoch`` of the stage (multistep) or 0-based global ``step`` (poly)."""
    if schedule.name == "poly":
        return poly_lr(base_lr, step, total_steps, schedule.power)
    return multistep_lr(base_lr, epoch, schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets ``lr`` times its ``lr_scale`` (1 unless the trainer scaled it: head / extra modules)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

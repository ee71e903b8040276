"""Cross-entropy baseline (docs/methods/vanilla.md): no teacher. Also the teacher-training method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, SEGMENTATION, Batch, Progress


@dataclass
class VanillaConfig:
    ce_weight: float = 1.0  # RepDistiller train_teacher.py / mdistiller Vanilla: plain CE


@register_method("vanilla")
class Vanilla(Distiller):
    supported_tasks = (CLASSIFICATION, SEGMENTATION)
    Config = VanillaConfig
    requires_teacher = False

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        return {"loss_ce": self.cfg.ce_weight * self.task_loss(student.logits, batch.target)}

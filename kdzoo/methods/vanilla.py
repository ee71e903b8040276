"""Cross-entropy baseline (docs/methods/vanilla.md): no teacher. Also the teacher-training method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION, Batch, Progress


@dataclass
class VanillaConfig:
    ce_weight: float = 1.0  # RepDistiller train_teacher.py / mdistiller Vanilla: plain CE


@register_method("vanilla")
class Vanilla(Distiller):
    supported_tasks = (CLASSIFICATION, SEGMENTATION, DETECTION)
    Config = VanillaConfig
    requires_teacher = False

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        # Detection: the detector's own loss terms (their weights are torchvision's; ce_weight scales them all).
        return {k: self.cfg.ce_weight * v for k, v in self.task_loss_terms(student, batch.target).items()}

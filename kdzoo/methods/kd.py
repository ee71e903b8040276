"""KD — Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531
(methods.md §2). RepDistiller's ``DistillKL`` is the reference; mdistiller's ``kd_loss`` is identical."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.types import Batch, Progress
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs


@dataclass
class KDConfig:
    temperature: float = 4.0  # RD scripts/run_cifar_distill.sh --kd_T 4 (MD cfg.py KD.TEMPERATURE 4)
    ce_weight: float = 0.1  # RD -r 0.1 (MD KD.LOSS.CE_WEIGHT 0.1); ImageNet recipes use 0.5
    kd_weight: float = 0.9  # RD -a 0.9 (MD KD.LOSS.KD_WEIGHT 0.9); ImageNet recipes use 0.5


@register_method("kd")
class KD(Distiller):
    Config = KDConfig

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        return self.ce_and_kd(student.logits, teacher.logits, batch.target)

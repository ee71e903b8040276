"""KD — Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531
(docs/methods/kd.md). RepDistiller's ``DistillKL`` is the reference; mdistiller's ``kd_loss`` is identical.

Detection: the detector's own losses (scaled by ``ce_weight``) plus KD between the student's and the teacher's ROI
class logits of the student's sampled proposals (:meth:`Distiller.ce_and_kd`), the logit distillation of mdistiller
``detection/model/rcnn.py`` with the KD loss in place of DKD's. The CIFAR defaults below (ce_weight 0.1) would shrink
the detector's losses tenfold: detection recipes set their own weights."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, DETECTION, Batch, Progress


@dataclass
class KDConfig:
    temperature: float = 4.0  # RepDistiller scripts/run_cifar_distill.sh --kd_T 4 (mdistiller cfg.py KD.TEMPERATURE 4)
    ce_weight: float = 0.1  # RepDistiller -r 0.1 (mdistiller KD.LOSS.CE_WEIGHT 0.1); ImageNet recipes use 0.5
    kd_weight: float = 0.9  # RepDistiller -a 0.9 (mdistiller KD.LOSS.KD_WEIGHT 0.9); ImageNet recipes use 0.5


@register_method("kd")
class KD(Distiller):
    supported_tasks = (CLASSIFICATION, DETECTION)
    Config = KDConfig

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        return self.ce_and_kd(student.logits, teacher.logits, batch.target, student=student)

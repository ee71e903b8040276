"""The shared shape of the dense logit methods (CWD, pixel KD): the student's own segmentation loss plus one
weighted term comparing the two networks' class-score maps before upsampling (the ``dense_logits`` taps)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.models.taps import Outputs
from kdzoo.types import SEGMENTATION, Batch, Progress


class DenseLogitDistiller(Distiller):
    """Subclasses name their loss term and implement :meth:`dense_term` (unweighted); their config has
    ``ce_weight`` and the term's weight under ``weight_key``."""

    supported_tasks = (SEGMENTATION,)
    teacher_taps = ("dense_logits",)
    student_taps = ("dense_logits",)
    loss_name: ClassVar[str] = ""
    weight_key: ClassVar[str] = ""
    purpose: ClassVar[str] = ""  # completes "<purpose>, which must agree" when the maps' shapes differ

    def build(self) -> None:
        self.check_dense_logits_agree(self.purpose)

    def dense_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        raise NotImplementedError

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.dense_logits is not None and teacher.dense_logits is not None
        cfg = self.cfg
        return {
            "loss_ce": cfg.ce_weight * self.task_loss(student.logits, batch.target),
            self.loss_name: getattr(cfg, self.weight_key) * self.dense_term(student.dense_logits,
                                                                            teacher.dense_logits),
        }

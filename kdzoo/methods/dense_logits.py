"""The shared shape of the dense logit methods (CWD, pixel KD): the student's own segmentation loss plus one
weighted term comparing the two networks' class-score maps before upsampling (the ``dense_logits`` taps)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.models.taps import Outputs
from kdzoo.types import SEGMENTATION, Batch, Progress


def tempered_kl_sum(student_map: Tensor, teacher_map: Tensor, temperature: float, dim: int, what: str,
                    flatten: bool = False) -> Tensor:
    """T^2 * sum of KL(softmax(teacher / T) || softmax(student / T)) over every distribution along ``dim`` (and
    every element), in fp32 with autocast off (docs/design.md); ``flatten`` first merges the dimensions from
    ``dim`` on (CWD's H*W distributions); ``what`` names the method in the shape error."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"{what} needs equal maps, got {tuple(student_map.shape)} and {tuple(teacher_map.shape)}")
    if flatten:
        student_map, teacher_map = student_map.flatten(dim), teacher_map.flatten(dim)
    with autocast_off(student_map):
        log_p_s = F.log_softmax(at_least_fp32(student_map) / temperature, dim=dim)
        log_p_t = F.log_softmax(at_least_fp32(teacher_map) / temperature, dim=dim)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * temperature**2


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

    def term_weight(self) -> float:
        """The weight of :meth:`dense_term`: the config's ``weight_key`` value."""
        return getattr(self.cfg, self.weight_key)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.dense_logits is not None and teacher.dense_logits is not None
        cfg = self.cfg
        return {
            "loss_ce": cfg.ce_weight * self.task_loss(student.logits, batch.target),
            self.loss_name: self.term_weight() * self.dense_term(student.dense_logits, teacher.dense_logits),
        }

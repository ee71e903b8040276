"""SP — Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv 1907.09682
(docs/methods/sp.md). Reference: RepDistiller ``distiller_zoo/SP.py`` ``Similarity`` on the last stage map
(RepDistiller ``feat[-2]``); mdistiller's ``sp_loss`` is identical."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class SPConfig:
    # RepDistiller scripts/run_cifar_distill.sh -b 3000 (mdistiller SP.LOSS.FEAT_WEIGHT 3000)
    feat_weight: float = 3000.0
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller SP.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0 (SimKD -d 1 adds KD)
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0


def similarity_matrix(feature_map: Tensor) -> Tensor:
    """Paper eq. 2: batch Gram matrix of the flattened maps, each row L2-normalised. [B, B]"""
    flat = feature_map.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Paper eq. 4: squared Frobenius distance of the similarity matrices over B^2 (any C, H, W)."""
    batch_size = student_map.shape[0]
    with autocast_off(student_map):
        difference = similarity_matrix(at_least_fp32(teacher_map)) - similarity_matrix(at_least_fp32(student_map))
        return difference.pow(2).sum() / (batch_size * batch_size)


@register_method("sp")
class SP(Distiller):
    Config = SPConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        losses["loss_sp"] = cfg.feat_weight * sp_loss(student.feats[-1], teacher.feats[-1])
        return losses

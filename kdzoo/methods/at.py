"""AT — Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, arXiv 1612.03928
(docs/methods/at.md). Reference: RepDistiller ``distiller_zoo/AT.py`` ``Attention(p=2)`` on every stage map;
mdistiller's ``AT`` computes the same value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import pooled_pair_terms
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, SEGMENTATION, Batch, Progress


@dataclass
class ATConfig:
    p: float = 2.0  # RepDistiller train_student.py Attention(p=2) (mdistiller AT.P 2)
    # RepDistiller scripts/run_cifar_distill.sh -b 1000 (mdistiller AT.LOSS.FEAT_WEIGHT 1000)
    feat_weight: float = 1000.0
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller AT.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0 (SimKD -d 1 adds KD)
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0


def attention_map(feature_map: Tensor, p: float) -> Tensor:
    """Paper eq. 2 with F_mean^p: channel mean of |A|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature_map.pow(p).mean(dim=1).flatten(1), dim=1)


def at_stage_losses(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float) -> list[Tensor]:
    """One term per stage pair: mean over B*H*W of the squared attention-map difference. Pairs are
    zipped like the reference (extra stages on the longer side are ignored)."""

    def term(f_s: Tensor, f_t: Tensor) -> Tensor:
        return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()

    return pooled_pair_terms(student_feats, teacher_feats, term)


@register_method("at")
class AT(Distiller):
    supported_tasks = (CLASSIFICATION, SEGMENTATION)
    Config = ATConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        # RepDistiller feat[1:-1]: every stage map after the stem.
        losses["loss_at"] = cfg.feat_weight * sum(at_stage_losses(student.feats[1:], teacher.feats[1:], cfg.p))
        return losses

"""PKT — Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018, arXiv 1803.10837 (docs/methods/pkt.md). Reference: RepDistiller ``distiller_zoo/PKT.py``
(cosine-similarity kernel, KL divergence between the conditional probability matrices)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress

PKT_EPS = 1e-7  # RepDistiller cosine_similarity_loss(eps=0.0000001), in the normalisation and inside the log


@dataclass
class PKTConfig:
    # RepDistiller scripts/run_cifar_distill.sh -b 30000 (mdistiller PKT.LOSS.FEAT_WEIGHT 30000)
    feat_weight: float = 30000.0
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller PKT.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0


def conditional_probabilities(embedding: Tensor) -> Tensor:
    """Paper eq. 10: cosine similarities shifted to [0, 1], each row normalised to sum 1 (diagonal kept)."""
    x = embedding.flatten(1)
    x = x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + PKT_EPS)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # the reference zeroes NaNs (not infs)
    similarity = (x @ x.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """KL(P_t || P_s) averaged over all B^2 entries (the reference's mean, i.e. row-KL / B)."""
    with autocast_off(student_embedding):
        p_s = conditional_probabilities(at_least_fp32(student_embedding))
        p_t = conditional_probabilities(at_least_fp32(teacher_embedding))
        return torch.mean(p_t * torch.log((p_t + PKT_EPS) / (p_s + PKT_EPS)))


@register_method("pkt")
class PKT(Distiller):
    Config = PKTConfig
    teacher_taps = ("pooled",)
    student_taps = ("pooled",)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.pooled is not None and teacher.pooled is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        losses["loss_pkt"] = cfg.feat_weight * pkt_loss(student.pooled, teacher.pooled)
        return losses

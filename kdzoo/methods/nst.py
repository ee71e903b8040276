"""NST — Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv 1707.01219 (docs/methods/nst.md). Reference: RepDistiller ``distiller_zoo/NST.py`` ``NSTLoss``
(polynomial kernel k(x, y) = (x^T y)^2, full MMD including the constant teacher-teacher term).

The reference forms [B, C, C, HW] broadcast products; the kernel matrices here are Gram matrices of
the channel-normalised maps computed with ``bmm`` ([B, C, C] only), the same sums in another order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import pooled_pair_terms
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class NSTConfig:
    feat_weight: float = 50.0  # RepDistiller scripts/run_cifar_distill.sh -b 50 (mdistiller NST.LOSS.FEAT_WEIGHT 50)
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller NST.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over [B, C_a, C_b] of (a_i^T b_j)^2 for per-channel rows a [B, C_a, HW], b [B, C_b, HW]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def poly_mmd(s: Tensor, t: Tensor) -> Tensor:
    """Squared MMD of the rows of s [B, C_s, HW] and t [B, C_t, HW] under k(x, y) = (x^T y)^2:
    mean k(t, t) + mean k(s, s) - 2 mean k(s, t), the first a constant (no gradient).

    sum_ij (a_i^T b_j)^2 = ||A B^T||_F^2 = <A^T A, B^T B>_F, so the three sums also come from the two
    [HW, HW] Gram matrices. Deep stages have more channels than positions (256 channels, 8x8 maps), where
    that is several times less work than the [C, C] products; the cheaper form is taken per stage."""
    batch, c_s, hw = s.shape
    c_t = t.shape[1]
    if hw * (c_s + c_t) >= c_s * c_s + c_t * c_t + c_s * c_t:
        constant = poly_kernel_mean(t, t).detach()
        return constant + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)
    gram_s, gram_t = s.mT @ s, (t.mT @ t).detach()
    constant = gram_t.pow(2).sum() / (batch * c_t * c_t)
    return constant + gram_s.pow(2).sum() / (batch * c_s * c_s) - 2 * (gram_s * gram_t).sum() / (batch * c_s * c_t)


def nst_stage_losses(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> list[Tensor]:
    """Squared MMD (paper eq. 6, d = 2, c = 0) per stage pair; C_s may differ from C_t. The
    teacher-teacher term is a constant, kept so the logged value equals the reference's."""

    def term(f_s: Tensor, f_t: Tensor) -> Tensor:
        return poly_mmd(F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2))

    return pooled_pair_terms(student_feats, teacher_feats, term)


@register_method("nst")
class NST(Distiller):
    Config = NSTConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        # RepDistiller feat[1:-1]: every stage map after the stem.
        losses["loss_nst"] = cfg.feat_weight * sum(nst_stage_losses(student.feats[1:], teacher.feats[1:]))
        return losses

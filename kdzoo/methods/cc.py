"""CC — Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019, arXiv 1904.01802
(docs/methods/cc.md). Reference: RepDistiller ``distiller_zoo/CC.py`` ``Correlation`` (code the authors sent to
RepDistiller) with ``models/util.py`` ``LinearEmbed`` on both pooled features; both embeddings are
trained, the teacher's included (it is in RepDistiller's optimiser).

``variant="rd"`` (default, golden parity): L = mean_b sum_d |e_s - e_t|_b,d * |e_s - e_t|_b+1,d, which
pairs consecutive samples and so depends on the batch order. ``variant="paper"``: the paper's
correlation matrices C = k(E, E) with the Gaussian RBF replaced by its order-P Taylor expansion
(paper eq. 9), L = ||C_s - C_t||_F / B^2 (torchdistill ``CCKDLoss``, non-squared Frobenius norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress

VARIANTS = ("rd", "paper")


@dataclass
class CCConfig:
    feat_dim: int = 128  # RepDistiller train_student.py --feat_dim 128
    feat_weight: float = 0.02  # RepDistiller scripts/run_cifar_distill.sh -b 0.02
    ce_weight: float = 1.0  # RepDistiller -r 1
    kd_weight: float = 0.0  # RepDistiller -a 0
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0
    variant: str = "rd"  # "rd" (RepDistiller) | "paper" (Taylor-expanded Gaussian RBF, torchdistill)
    kernel_gamma: float = 0.4  # paper variant: RBF gamma (torchdistill CCKDLoss sample config gamma 0.4)
    kernel_order: int = 2  # paper variant: Taylor order P (torchdistill sample config max_p 2)


class LinearEmbed(nn.Module):
    """RepDistiller ``models/util.py`` ``LinearEmbed``: flatten, then one Linear (PyTorch default init)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def cc_loss_rd(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    delta = (at_least_fp32(student_embedding) - at_least_fp32(teacher_embedding)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def rbf_correlation(embedding: Tensor, gamma: float, order: int) -> Tensor:
    """exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (E E^T)^p, elementwise powers. [B, B]"""
    gram = embedding @ embedding.t()
    correlation = torch.ones_like(gram)
    for p in range(1, order + 1):
        correlation = correlation + (2 * gamma) ** p / math.factorial(p) * gram.pow(p)
    return correlation * math.exp(-2 * gamma)


def cc_loss_paper(student_embedding: Tensor, teacher_embedding: Tensor, gamma: float, order: int) -> Tensor:
    batch_size = student_embedding.shape[0]
    with autocast_off(student_embedding):
        c_s = rbf_correlation(at_least_fp32(student_embedding), gamma, order)
        c_t = rbf_correlation(at_least_fp32(teacher_embedding), gamma, order)
        return torch.linalg.matrix_norm(c_s - c_t) / batch_size**2


@register_method("cc")
class CC(Distiller):
    Config = CCConfig
    teacher_taps = ("pooled",)
    student_taps = ("pooled",)

    def build(self) -> None:
        if self.cfg.variant not in VARIANTS:
            raise UserInputError(f"cc.variant must be one of {VARIANTS}, got {self.cfg.variant!r}")
        student_pooled, teacher_pooled = self.probe_student().pooled, self.probe_teacher().pooled
        assert student_pooled is not None and teacher_pooled is not None
        # Registration order embed_s, embed_t = RepDistiller's module_list / trainable_list order.
        self.embed_s = LinearEmbed(student_pooled.flatten(1).shape[1], self.cfg.feat_dim)
        self.embed_t = LinearEmbed(teacher_pooled.flatten(1).shape[1], self.cfg.feat_dim)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.pooled is not None and teacher.pooled is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        # The teacher's pooled feature is detached, but embed_t itself is trained (RepDistiller trainable_list).
        e_s, e_t = self.embed_s(student.pooled), self.embed_t(teacher.pooled)
        if cfg.variant == "rd":
            loss = cc_loss_rd(e_s, e_t)
        else:
            loss = cc_loss_paper(e_s, e_t, cfg.kernel_gamma, cfg.kernel_order)
        losses["loss_cc"] = cfg.feat_weight * loss
        return losses

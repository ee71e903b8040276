"""RKD — Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv 1904.05068
(docs/methods/rkd.md). Reference: RepDistiller ``distiller_zoo/RKD.py`` ``RKDLoss(w_d=25, w_a=50)`` on the
pooled embeddings (mdistiller's ``rkd_loss`` is identical). The distance and angle terms are logged
separately; their sum is the reference's ``loss_kd``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class RKDConfig:
    distance_weight: float = 25.0  # RepDistiller RKDLoss(w_d=25) (mdistiller RKD.DISTANCE_WEIGHT 25; paper lambda_D 1)
    angle_weight: float = 50.0  # RepDistiller RKDLoss(w_a=50) (mdistiller RKD.ANGLE_WEIGHT 50; paper lambda_A 2)
    feat_weight: float = 1.0  # RepDistiller scripts/run_cifar_distill.sh -b 1 (mdistiller RKD.LOSS.FEAT_WEIGHT 1)
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller RKD.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0
    pdist_eps: float = 1e-12  # RepDistiller RKDLoss.pdist eps (mdistiller RKD.PDIST.EPSILON 1e-12)


def normalized_distances(embedding: Tensor, eps: float) -> Tensor:
    """Paper eq. 4: Euclidean distances (squared distance clamped at eps, zero diagonal) divided by
    their mean over the off-diagonal entries (not detached on the student side, as the reference)."""
    squared_norms = embedding.pow(2).sum(dim=1)
    squared = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * embedding @ embedding.t()).clamp(min=eps)
    eye = torch.eye(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    distances = squared.sqrt().masked_fill(eye, 0.0)
    # Off-diagonal entries are >= sqrt(eps) > 0, so this equals the reference's d[d > 0].mean()
    # without its boolean indexing (a host synchronisation).
    return distances / (distances.sum() / (distances > 0).sum())


def angles(embedding: Tensor) -> Tensor:
    """Paper eq. 6: cos of the angle at x_i between x_j and x_k, for all triplets, flattened [B^3]."""
    directions = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


def rkd_terms(student_embedding: Tensor, teacher_embedding: Tensor, eps: float = 1e-12,
              with_distance: bool = True, with_angle: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Unweighted (distance, angle) losses: Smooth-L1 (beta 1), mean over B^2 and B^3 entries."""
    with autocast_off(student_embedding):
        student = at_least_fp32(student_embedding.flatten(1))
        teacher = at_least_fp32(teacher_embedding.flatten(1)).detach()
        distance = angle = None
        if with_distance:
            with torch.no_grad():
                teacher_distances = normalized_distances(teacher, eps)
            distance = F.smooth_l1_loss(normalized_distances(student, eps), teacher_distances)
        if with_angle:
            with torch.no_grad():
                teacher_angles = angles(teacher)
            angle = F.smooth_l1_loss(angles(student), teacher_angles)
    return distance, angle


@register_method("rkd")
class RKD(Distiller):
    Config = RKDConfig
    teacher_taps = ("pooled",)
    student_taps = ("pooled",)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None and student.pooled is not None and teacher.pooled is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        # A zero weight skips its term (the angle term costs B^2*D memory and B^3 outputs).
        distance, angle = rkd_terms(student.pooled, teacher.pooled, cfg.pdist_eps,
                                    with_distance=bool(cfg.distance_weight), with_angle=bool(cfg.angle_weight))
        if distance is not None:
            losses["loss_rkd_distance"] = cfg.feat_weight * cfg.distance_weight * distance
        if angle is not None:
            losses["loss_rkd_angle"] = cfg.feat_weight * cfg.angle_weight * angle
        return losses

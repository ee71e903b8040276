"""DIST — Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv 2205.10536 (docs/methods/dist.md). Reference: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``
(``DIST`` with ``tau``): match Pearson correlations of the tempered class distributions, per sample across classes
(inter-class relation) and per class across the batch (intra-class relation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, cross_entropy
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class DISTConfig:
    beta: float = 2.0  # inter-class weight; authors' CIFAR-100 setting beta = gamma = 2, tau = 4 (docs/methods/dist.md)
    gamma: float = 2.0  # intra-class weight (ImageNet recipe: beta = gamma = 1)
    temperature: float = 4.0  # DIST paper CIFAR-100 tau = 4 (ImageNet: 1)
    ce_weight: float = 1.0  # DIST paper's total loss: 1*CE + beta*L_inter + gamma*L_intra (no KD term added)


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation = cosine similarity of mean-centred rows; the reference adds eps to the
    product of the norms (not a clamp)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Raw (inter, intra) relation losses, each ``tau^2 * (1 - mean Pearson correlation)``."""
    p_s = F.softmax(at_least_fp32(student_logits) / temperature, dim=1)
    p_t = F.softmax(at_least_fp32(teacher_logits) / temperature, dim=1)
    inter = 1.0 - pearson_correlation(p_s, p_t).mean()  # over classes, per sample
    intra = 1.0 - pearson_correlation(p_s.t(), p_t.t()).mean()  # over the batch, per class
    return temperature**2 * inter, temperature**2 * intra


@register_method("dist")
class DIST(Distiller):
    Config = DISTConfig

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        inter, intra = dist_terms(student.logits, teacher.logits, cfg.temperature)
        return {
            "loss_ce": cfg.ce_weight * cross_entropy(student.logits, batch.target),
            "loss_dist_inter": cfg.beta * inter,
            "loss_dist_intra": cfg.gamma * intra,
        }

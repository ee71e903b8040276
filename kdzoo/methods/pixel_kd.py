"""Pixel-wise KD — Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019, arXiv 1903.04197, Sec. 3.1 (docs/methods/pixel_kd.md). Reference: the official
irfanICMLL/structure_knowledge_distillation ``utils/criterion.py`` ``CriterionPixelWise``: Hinton's KD applied
to every pixel's class distribution of the score maps before upsampling (kdzoo's ``dense_logits`` tap)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.dense_logits import DenseLogitDistiller, tempered_kl_sum
from kdzoo.methods.registry import register_method


@dataclass
class PixelKDConfig:
    pixel_weight: float = 10.0  # structure_knowledge_distillation train script --lambda-pi 10 (paper Sec. 4.1)
    temperature: float = 1.0  # the reference uses plain softmaxes (T = 1); T^2 scaling applies for T != 1
    ce_weight: float = 1.0  # the student's own segmentation loss, unweighted in the reference


def pixel_kd_loss(student_map: Tensor, teacher_map: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_t || p_s) of every pixel's class distribution, summed over the batch and the pixels and
    divided by H * W (the reference's ``sum(...) / W / H``: a sum over the batch, a mean over the pixels).
    The reference writes the teacher-to-student cross-entropy, which differs from this KL only by the
    teacher's entropy: same gradients, and 0 when the maps agree. fp32 with autocast off."""
    height, width = student_map.shape[-2:]
    return tempered_kl_sum(student_map, teacher_map, temperature, dim=1, what="pixel KD") / (height * width)


@register_method("pixel_kd")
class PixelKD(DenseLogitDistiller):
    Config = PixelKDConfig
    loss_name = "loss_pixel_kd"
    weight_key = "pixel_weight"
    purpose = "pixel KD compares the class-score maps of both networks"

    def dense_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return pixel_kd_loss(student_map, teacher_map, self.cfg.temperature)

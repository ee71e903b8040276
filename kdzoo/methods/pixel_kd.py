"""Pixel-wise KD — Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019, arXiv 1903.04197, Sec. 3.1 (docs/methods/pixel_kd.md). Reference: the official
irfanICMLL/structure_knowledge_distillation ``utils/criterion.py`` ``CriterionPixelWise``: Hinton's KD applied
to every pixel's class distribution of the score maps before upsampling (kdzoo's ``dense_logits`` tap)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.dense_logits import DenseLogitDistiller
from kdzoo.methods.losses import at_least_fp32, autocast_off
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
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"pixel KD needs equal maps, got {tuple(student_map.shape)} and {tuple(teacher_map.shape)}")
    height, width = student_map.shape[-2:]
    with autocast_off(student_map):
        log_p_s = F.log_softmax(at_least_fp32(student_map) / temperature, dim=1)
        log_p_t = F.log_softmax(at_least_fp32(teacher_map) / temperature, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * temperature**2 / (height * width)


@register_method("pixel_kd")
class PixelKD(DenseLogitDistiller):
    Config = PixelKDConfig
    loss_name = "loss_pixel_kd"
    weight_key = "pixel_weight"
    purpose = "pixel KD compares the class-score maps of both networks"

    def dense_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return pixel_kd_loss(student_map, teacher_map, self.cfg.temperature)

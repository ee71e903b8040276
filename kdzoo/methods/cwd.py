"""CWD — Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
arXiv 2011.13256 (docs/methods/cwd.md). Reference: MMRazor ``mmrazor/models/losses/cwd.py``
(``ChannelWiseDivergence``), the standard dense-prediction KD in OpenMMLab, on the class-score maps of
both networks before upsampling (MMRazor records ``decode_head.conv_seg``; kdzoo's ``dense_logits`` tap)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.dense_logits import DenseLogitDistiller, tempered_kl_sum
from kdzoo.methods.registry import register_method


@dataclass
class CWDConfig:
    # MMRazor configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py:
    # loss_cwd=dict(type='ChannelWiseDivergence', tau=1, loss_weight=5).
    tau: float = 1.0
    cwd_weight: float = 5.0
    ce_weight: float = 1.0  # the student's own segmentation loss, unweighted (MMRazor keeps the decode loss as is)


def channel_wise_divergence(student_map: Tensor, teacher_map: Tensor, tau: float) -> Tensor:
    """Paper Eq. 4: each channel's H*W map becomes a distribution by a spatial softmax at temperature ``tau``;
    tau^2 * KL(teacher || student) summed over the pixels and the channels, divided by C * N (MMRazor's
    normalisation). fp32 with autocast off (docs/design.md)."""
    n, c = student_map.shape[:2]
    return tempered_kl_sum(student_map, teacher_map, tau, dim=2, what="CWD", flatten=True) / (c * n)


@register_method("cwd")
class CWD(DenseLogitDistiller):
    Config = CWDConfig
    loss_name = "loss_cwd"
    weight_key = "cwd_weight"
    purpose = "CWD distils the class-score maps of both networks"

    def dense_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return channel_wise_divergence(student_map, teacher_map, self.cfg.tau)

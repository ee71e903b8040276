"""CWD — Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
arXiv 2011.13256 (docs/methods/cwd.md). Reference: MMRazor ``mmrazor/models/losses/cwd.py``
(``ChannelWiseDivergence``), the standard dense-prediction KD in OpenMMLab.

Segmentation: the class-score maps of both networks before upsampling (MMRazor records ``decode_head.conv_seg``;
kdzoo's ``dense_logits`` tap). Detection: the FPN levels, as MMRazor's
``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py`` (and the RetinaNet config built on it) records
the whole ``neck`` output and puts one ``ChannelWiseDivergence`` (tau 1, weight 10) on each of its five levels
(``data_idx`` 0..4: P2..P6 for Faster R-CNN, P3..P7 for RetinaNet), no connector (both necks are 256 wide), added to
the student's own losses; its ``FpnTeacherDistill`` runs only the teacher's backbone and neck, as kdzoo's teacher
forward does for a one-stage student. Levels are paired by name (torchvision's ``'0'..'3', 'pool'`` or ``'0'..'2',
'p6', 'p7'``), as FitNet's detection hints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.errors import UserInputError
from kdzoo.methods.dense_logits import DenseLogitDistiller, tempered_kl_sum
from kdzoo.methods.registry import register_method
from kdzoo.methods.reviewkd import drop_taps, probe_fpn_levels
from kdzoo.models.taps import Outputs
from kdzoo.types import DETECTION, SEGMENTATION, Batch, Progress

# The weight of each map's ChannelWiseDivergence in MMRazor's configs (``loss_weight``), per task:
# configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py: 5;
# configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py (and cwd_fpn_retina_r101_retina_r50_1x_coco.py,
# which inherits it): 10 on every FPN level.
MMRAZOR_CWD_WEIGHTS = {SEGMENTATION: 5.0, DETECTION: 10.0}


@dataclass
class CWDConfig:
    tau: float = 1.0  # MMRazor's mmseg and mmdet CWD configs: tau=1
    cwd_weight: float | None = None  # None = MMRazor's weight for the task (MMRAZOR_CWD_WEIGHTS: 5 / 10 per level)
    ce_weight: float = 1.0  # the student's own losses, unweighted (MMRazor adds them as they are)
    # Detection only: the FPN levels distilled, by name (None = every level both detectors have: MMRazor's five).
    fpn_levels: list[str] | None = None


def channel_wise_divergence(student_map: Tensor, teacher_map: Tensor, tau: float) -> Tensor:
    """Paper Eq. 4: each channel's H*W map becomes a distribution by a spatial softmax at temperature ``tau``;
    tau^2 * KL(teacher || student) summed over the pixels and the channels, divided by C * N (MMRazor's
    normalisation). fp32 with autocast off (docs/design.md)."""
    n, c = student_map.shape[:2]
    return tempered_kl_sum(student_map, teacher_map, tau, dim=2, what="CWD", flatten=True) / (c * n)


def matched_fpn_levels(student_levels: Mapping[str, Sequence[int]], teacher_levels: Mapping[str, Sequence[int]],
                       requested: Sequence[str] | None) -> list[str]:
    """The FPN levels CWD pairs (``requested``, or every name both have), given each level's probed [1, C, H, W]
    shape. MMRazor's loss takes no connector, so paired levels need one width; one probe size, so equal H, W means
    equal strides (a RetinaNet ``'0'`` is P3, a Faster R-CNN ``'0'`` P2: not the same level)."""
    common = [name for name in student_levels if name in teacher_levels]
    names = common if requested is None else list(requested)
    unknown = [name for name in names if name not in common]
    if unknown or not names:
        raise UserInputError(f"cwd.fpn_levels={names}: the FPN levels both detectors have are {common}")
    for name in names:
        (_, s_channels, *s_size), (_, t_channels, *t_size) = student_levels[name], teacher_levels[name]
        if s_channels != t_channels:
            raise UserInputError(f"cwd compares FPN level {name!r} channel by channel without a connector (as "
                                 f"MMRazor), but the student's has {s_channels} channels and the teacher's "
                                 f"{t_channels}")
        if s_size != t_size:
            raise UserInputError(f"FPN level {name!r} is {s_size[0]}x{s_size[1]} in the student but "
                                 f"{t_size[0]}x{t_size[1]} in the teacher on one probe image (another stride); set "
                                 "cwd.fpn_levels to levels both detectors compute at one stride")
    return names


def fpn_channel_wise_divergence(student_fpn: Mapping[str, Tensor], teacher_fpn: Mapping[str, Tensor],
                                levels: Sequence[str], tau: float) -> Tensor:
    """Sum over ``levels`` of :func:`channel_wise_divergence` (each level normalised by its own C * N, as MMRazor's
    one loss per level). A student level of another size than the teacher's (the two transforms resized the images
    differently; never in MMRazor, which feeds both one batch) is resized bilinearly first, as FitNet's hints."""
    terms = []
    for name in levels:
        student_map, teacher_map = student_fpn[name], teacher_fpn[name]
        if student_map.shape[-2:] != teacher_map.shape[-2:]:
            student_map = F.interpolate(student_map, size=teacher_map.shape[-2:], mode="bilinear", align_corners=False)
        terms.append(channel_wise_divergence(student_map, teacher_map, tau))
    return torch.stack(terms).sum()


@register_method("cwd")
class CWD(DenseLogitDistiller):
    """Segmentation reads the ``dense_logits`` taps (the class attributes); detection drops them in :meth:`build`
    and reads the FPN levels of the opened-up forward (``Outputs.detector.fpn``), as FitNet and ReviewKD do."""

    supported_tasks = (SEGMENTATION, DETECTION)
    Config = CWDConfig
    loss_name = "loss_cwd"
    weight_key = "cwd_weight"
    purpose = "CWD distils the class-score maps of both networks"

    def build(self) -> None:
        if self.task.name != DETECTION:
            super().build()
            return
        assert self.teacher is not None
        drop_taps(self)
        self.fpn_levels = matched_fpn_levels(probe_fpn_levels(self.student), probe_fpn_levels(self.teacher),
                                             self.cfg.fpn_levels)

    def term_weight(self) -> float:
        weight = self.cfg.cwd_weight
        return MMRAZOR_CWD_WEIGHTS[self.task.name] if weight is None else weight

    def dense_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        return channel_wise_divergence(student_map, teacher_map, self.cfg.tau)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        if self.task.name != DETECTION:
            return super().compute_losses(student, teacher, batch, progress)
        assert teacher is not None
        cfg = self.cfg
        losses = {k: cfg.ce_weight * v for k, v in self.task_loss_terms(student, batch.target).items()}
        divergence = fpn_channel_wise_divergence(student.detector.fpn, teacher.detector.fpn, self.fpn_levels, cfg.tau)
        losses[self.loss_name] = self.term_weight() * divergence
        return losses

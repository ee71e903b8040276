"""SimKD — Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022, arXiv 2203.14001
(methods.md §20). Reference: DefangChen/SimKD ``models/util.py SimKD`` and ``helper/loops.py train_distill``.

A projector maps the student's last feature map onto the teacher's; the frozen teacher classifier then
classifies the projected features. Projector and teacher classifier stay in the deployed network, so
:meth:`SimKD.export_student` returns a :class:`SimKDStudent` and evaluation goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller, find_classifier
from kdzoo.types import Batch, Progress
from kdzoo.methods.losses import at_least_fp32
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import FeatureExtractor, Outputs


@dataclass
class SimKDConfig:
    factor: int = 2  # SK train_student.py -f/--factor default 2 (scripts/run_distill.sh passes none); README: 2/4/8
    simkd_weight: float = 1.0  # SK scripts/run_distill.sh -b 1
    ce_weight: float = 0.0  # SK -c 0 (CE on the student's own, unused, logits)
    kd_weight: float = 0.0  # SK -d 0
    temperature: float = 4.0  # SK --kd_T 4 (only used when kd_weight > 0)


def simkd_projector(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """SK's bottleneck 1x1 -> 3x3 -> 1x1 projector, each conv (bias-free) followed by BN + ReLU; default init."""
    mid = out_channels // factor
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SimKDStudent(nn.Module):
    """The deployed SimKD network: student backbone -> projector -> GAP -> frozen teacher classifier.

    ``size_ratio`` = (teacher map height / student map height, same for width) measured at the training
    resolution: SK's validation runs the teacher only to learn the map size; here it is known statically.
    ``extractor`` lets the distiller share its hooks on the student (one set of hooks per model).
    """

    def __init__(self, student: nn.Module, projector: nn.Module, teacher_classifier: nn.Module,
                 size_ratio: tuple[float, float], extractor: FeatureExtractor | None = None):
        super().__init__()
        self.student = student
        self.projector = projector
        self.classifier = teacher_classifier
        self.size_ratio = size_ratio
        self._extractor = extractor if extractor is not None else FeatureExtractor(student, ("feats",))

    def train(self, mode: bool = True) -> SimKDStudent:
        super().train(mode)
        self.classifier.train(False)  # the teacher's classifier is frozen: never in train mode (dropout heads)
        return self

    def classify(self, projected: Tensor) -> Tensor:
        """SK: ``cls_t(avg_pool(P(f_s)))``."""
        return self.classifier(projected.mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        feat = self._extractor(images).feats[-1]
        height, width = feat.shape[-2:]
        target = (round(height * self.size_ratio[0]), round(width * self.size_ratio[1]))
        if height > target[0]:  # SK pools the student only when its map is larger than the teacher's
            feat = F.adaptive_avg_pool2d(feat, target)
        return self.classify(self.projector(feat))


def align_spatial(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """SK SimKD/SelfA: average-pool the larger map down to the smaller one's size."""
    s_size, t_size = student_map.shape[-2:], teacher_map.shape[-2:]
    if s_size[0] > t_size[0]:
        return F.adaptive_avg_pool2d(student_map, t_size), teacher_map
    if s_size != t_size:
        return student_map, F.adaptive_avg_pool2d(teacher_map, s_size)
    return student_map, teacher_map


@register_method("simkd")
class SimKD(Distiller):
    Config = SimKDConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)
    # The student's own head (classifier; WRN's final BN, ShuffleNet's last conv) gets no gradient: under DDP
    # the trainer must set find_unused_parameters.
    leaves_parameters_unused: ClassVar[bool] = True

    def build(self) -> None:
        assert self.teacher is not None
        teacher_classifier = find_classifier(self.teacher, "simkd reuses the teacher's classifier")
        teacher_probe = self.probe_teacher()
        s_map, t_map = self.probe_student().feats[-1], teacher_probe.feats[-1]
        if teacher_probe.pooled is None or teacher_probe.pooled.shape[1] != t_map.shape[1]:
            raise UserInputError(
                f"simkd feeds the projected last feature map ({t_map.shape[1]} channels) to the teacher's classifier, "
                f"but {type(self.teacher).__name__}'s classifier takes a different embedding")
        self.projector = simkd_projector(s_map.shape[1], t_map.shape[1], self.cfg.factor)
        ratio = (t_map.shape[-2] / s_map.shape[-2], t_map.shape[-1] / s_map.shape[-1])
        # Not registered as a child: its modules already belong to the distiller (no duplicate state_dict keys).
        object.__setattr__(self, "_deployed", SimKDStudent(
            self.student, self.projector, teacher_classifier, ratio, extractor=self.student_extractor))

    def export_student(self) -> nn.Module:
        return self._deployed

    def _logits_and_losses(self, student: Outputs, teacher: Outputs | None,
                           batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        cfg = self.cfg
        source, target = align_spatial(student.feats[-1], teacher.feats[-1])
        projected = self.projector(source)
        # SK computes CE/KD on the student's own logits (weighted 0 by default) before replacing them.
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        losses["loss_simkd"] = cfg.simkd_weight * F.mse_loss(at_least_fp32(projected), at_least_fp32(target))
        return self._deployed.classify(projected), losses

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        return self._logits_and_losses(student, teacher, batch)[1]

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        # The training logits are the teacher-classifier predictions (SK: ``logit_s = pred_feat_s``).
        teacher_out = self.teacher_forward(batch)
        student_out = self.student_extractor(batch.image)
        return self._logits_and_losses(student_out, teacher_out, batch)

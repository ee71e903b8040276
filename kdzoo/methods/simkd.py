"""SimKD — Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022, arXiv 2203.14001
(docs/methods/simkd.md). Reference: DefangChen/SimKD ``models/util.py SimKD`` and ``helper/loops.py train_distill``.

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
from kdzoo.methods.losses import align_spatial, at_least_fp32
from kdzoo.methods.projectors import bottleneck_projector
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import FeatureExtractor, Outputs
from kdzoo.types import Batch, Progress


@dataclass
class SimKDConfig:
    factor: int = 2  # SimKD train_student.py -f/--factor default 2 (scripts/run_distill.sh passes none); README: 2/4/8
    simkd_weight: float = 1.0  # SimKD scripts/run_distill.sh -b 1
    ce_weight: float = 0.0  # SimKD -c 0 (CE on the student's own, unused, logits)
    kd_weight: float = 0.0  # SimKD -d 0
    temperature: float = 4.0  # SimKD --kd_T 4 (only used when kd_weight > 0)


class SimKDStudent(nn.Module):
    """The deployed SimKD network: student backbone -> projector -> GAP -> frozen teacher classifier.

    ``size_ratio`` = (teacher map height / student map height, same for width) measured at the training
    resolution: SimKD's validation runs the teacher only to learn the map size; here it is known statically.
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
        """SimKD: ``cls_t(avg_pool(P(f_s)))``."""
        return self.classifier(projected.mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        feat = self._extractor(images).feats[-1]
        # Python ints: under torch.jit.trace (`kdzoo export --format torchscript`) sizes are tensors, which round()
        # rejects; the map size is fixed by the input size the network was exported at.
        height, width = int(feat.shape[-2]), int(feat.shape[-1])
        target = (round(height * self.size_ratio[0]), round(width * self.size_ratio[1]))
        if height > target[0]:  # SimKD pools the student only when its map is larger than the teacher's
            feat = F.adaptive_avg_pool2d(feat, target)
        return self.classify(self.projector(feat))


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
        # SimKD: bottleneck width C_t / factor, each conv followed by BN + ReLU.
        self.projector = bottleneck_projector(s_map.shape[1], t_map.shape[1] // self.cfg.factor, t_map.shape[1],
                                              final_bn_relu=True)
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
        # SimKD computes CE/KD on the student's own logits (weighted 0 by default) before replacing them.
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        losses["loss_simkd"] = cfg.simkd_weight * F.mse_loss(at_least_fp32(projected), at_least_fp32(target))
        return self._deployed.classify(projected), losses

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        return self._logits_and_losses(student, teacher, batch)[1]

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        # The training logits are the teacher-classifier predictions (SimKD: ``logit_s = pred_feat_s``).
        teacher_out = self.teacher_forward(batch)
        student_out = self.student_extractor(batch.image)
        return self._logits_and_losses(student_out, teacher_out, batch)

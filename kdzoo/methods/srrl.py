"""SRRL — Yang, Martinez, Bulat, Tzimiropoulos, "Knowledge Distillation via Softmax Regression Representation
Learning", ICLR 2021 (OpenReview ZzwDy_wiWv) (docs/methods/srrl.md). Reference: DefangChen/SimKD ``models/util.py SRRL``
and ``helper/loops.py train_distill`` (branch ``srrl``), which adds CE + KD(T=4) with weight 1 each.

A connector maps the student's pooled embedding to the teacher's width; it is regressed onto the teacher's
embedding and, through the frozen teacher classifier, onto the teacher's logits. The connector is discarded
at test time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.methods.base import Distiller, find_classifier
from kdzoo.methods.losses import at_least_fp32
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class SRRLConfig:
    srrl_weight: float = 1.0  # SimKD scripts/run_distill.sh -b 1 (scales both regression terms, as SimKD's loss_kd)
    ce_weight: float = 1.0  # SimKD -c 1
    kd_weight: float = 1.0  # SimKD -d 1
    temperature: float = 4.0  # SimKD --kd_T 4


@register_method("srrl")
class SRRL(Distiller):
    Config = SRRLConfig
    teacher_taps = ("pooled",)
    student_taps = ("pooled",)

    def build(self) -> None:
        assert self.teacher is not None
        teacher_classifier = find_classifier(self.teacher, "srrl regresses through the teacher's classifier")
        # Kept out of the module tree: it is the teacher's (frozen, checkpointed with the teacher).
        object.__setattr__(self, "_teacher_classifier", teacher_classifier)
        s_dim = self.probe_student().pooled.shape[1]
        t_dim = self.probe_teacher().pooled.shape[1]
        # SimKD applies a 1x1 conv + BN2d + ReLU to the embedding viewed as [B, C, 1, 1] (== Linear + BN1d + ReLU);
        # kept as convolutions so the reference state_dict loads unchanged.
        self.connector = nn.Sequential(
            nn.Conv2d(s_dim, t_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(t_dim),
            nn.ReLU(inplace=True),
        )

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None and student.pooled is not None and teacher.pooled is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        embedding = self.connector(student.pooled[:, :, None, None]).flatten(1)
        # The classifier belongs to the frozen teacher (requires_grad False): gradients flow only to the connector.
        logits_via_teacher = self._teacher_classifier(embedding)
        feat_term = F.mse_loss(at_least_fp32(embedding), at_least_fp32(teacher.pooled))
        logit_term = F.mse_loss(at_least_fp32(logits_via_teacher), at_least_fp32(teacher.logits))
        losses["loss_srrl_feat"] = cfg.srrl_weight * feat_term
        losses["loss_srrl_logit"] = cfg.srrl_weight * logit_term
        return losses

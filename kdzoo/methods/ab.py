"""AB — Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
AAAI 2019, arXiv 1811.03233 (docs/methods/ab.md). Reference: RepDistiller ``distiller_zoo/AB.py ABLoss``,
``models/util.py Connector`` and ``helper/pretrain.py init``.

Two stages, as RepDistiller runs them: an init stage (30 epochs, constant base lr) trains the connectors and
the student's feature extractor (no classifier) on the activation-boundary loss alone; the main stage is plain
cross-entropy (RepDistiller's loop sets ``loss_kd = 0`` for AB, so its ``-b 1`` is inert) and needs no teacher
forward unless ``kd_weight`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.fitnet import ConvReg
from kdzoo.methods.init_stage import BodyInitDistiller
from kdzoo.methods.losses import at_least_fp32
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs


@dataclass
class ABConfig:
    margin: float = 1.0  # RepDistiller distiller_zoo/AB.py ABLoss(margin=1.0)
    init_epochs: int = 30  # RepDistiller train_student.py --init_epochs 30
    init_lr: float | None = None  # None = the base lr, as RepDistiller helper/pretrain.py (opt.learning_rate)
    ce_weight: float = 1.0  # RepDistiller scripts/run_cifar_distill.sh -r 1 (main stage)
    kd_weight: float = 0.0  # RepDistiller -a 0 (main stage)
    temperature: float = 4.0  # RepDistiller --kd_T 4 (only used when kd_weight > 0)


def connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """RepDistiller ``Connector``: identity where (C, H) agree, else RepDistiller's ``ConvReg`` without its ReLU (conv
    + BN)."""
    if student_shape[1] == teacher_shape[1] and student_shape[2] == teacher_shape[2]:
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, use_relu=False)


def ab_loss_terms(student_preacts: Sequence[Tensor], teacher_preacts: Sequence[Tensor], margin: float) -> list[Tensor]:
    """Weighted per-stage terms of RepDistiller's ``ABLoss``: ``w_i * sum(l) / B * 3/1000`` with ``w_i = 2^(i-N+1)``.

    RepDistiller's element loss ``(s+m)^2 [s > -m, t <= 0] + (s-m)^2 [s <= m, t > 0]`` is written as
    ``relu(s+m)^2`` / ``relu(m-s)^2`` selected by the teacher's sign (same values and gradients)."""
    count = len(student_preacts)
    terms = []
    for i, (s, t) in enumerate(zip(student_preacts, teacher_preacts)):
        s = at_least_fp32(s)
        element = torch.where(t > 0, F.relu(margin - s), F.relu(s + margin)).pow(2)
        terms.append(element.sum() * (2.0 ** (i - count + 1) / s.shape[0] * 3 / 1000))
    return terms


@register_method("ab")
class AB(BodyInitDistiller):
    Config = ABConfig
    teacher_taps = ("preact",)
    student_taps = ("preact",)
    init_trainable = ("connectors", "student_body")
    main_trainable = ("student",)  # RepDistiller: the connectors are not trained after init

    def build(self) -> None:
        super().build()
        s_maps, t_maps = self.probe_student().preact[1:], self.probe_teacher().preact[1:]
        if len(s_maps) != len(t_maps):
            raise UserInputError(f"ab pairs stages one to one, but the student has {len(s_maps)} and the teacher "
                                 f"{len(t_maps)}")
        self.connectors = nn.ModuleList(connector(s.shape, t.shape) for s, t in zip(s_maps, t_maps))

    def init_losses(self, student: Outputs, teacher: Outputs) -> dict[str, Tensor]:
        connected = [conv(f) for conv, f in zip(self.connectors, student.preact[1:])]
        return {"loss_ab": sum(ab_loss_terms(connected, teacher.preact[1:], self.cfg.margin))}

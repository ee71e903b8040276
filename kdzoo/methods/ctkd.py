"""CTKD — Li, Li, Yang, Cheng, Liu, Yang, Li, Yang, "Curriculum Temperature for Knowledge Distillation",
AAAI 2023, arXiv 2211.16231 (docs/methods/ctkd.md). Reference: zhengli97/CTKD ``train_student.py``, ``helper/loops.py``,
``models/temp_global.py`` (``Global_T``) and ``scripts/run_cifar_distill.sh`` (global temperature, cosine ramp).

KD whose temperature is learned adversarially: ``tau = t_start + t_range * sigmoid(GRL(theta))``. The gradient
reversal layer is the identity forward and multiplies the gradient by ``lambda(e)`` backward; ``lambda`` follows a
cosine ramp from 0 to ``-lambda_max`` over the first epochs, so the student minimises the KD loss while the
temperature increasingly maximises it (an easy-to-hard curriculum). ``theta`` is trained by the same SGD (with
weight decay) as the student, as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import ce_and_kd, kd_loss
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class CTKDConfig:
    ce_weight: float = 0.1  # CTKD scripts/run_cifar_distill.sh -r 0.1
    kd_weight: float = 0.9  # -a 0.9
    temperature_min: float = 1.0  # --t_start 1 (loops.py: temp = t_start + t_end * sigmoid(temp))
    temperature_range: float = 20.0  # --t_end 20
    init_logit: float = 1.0  # models/temp_global.py: global_T = nn.Parameter(torch.ones(1))
    lambda_max: float = 1.0  # --decay_max 0 --decay_min -1: the GRL scale ends at -1
    lambda_ramp_epochs: int = 10  # --decay_loops 10 with --cosine_decay 1


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (negative = reversed), as
    ``GradientReversalFunction`` in the reference (which multiplies by the schedule value, not by its negation)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * grad.new_tensor(ctx.scale), None


class GlobalTemperature(nn.Module):
    """CTKD's ``Global_T``: one learnable logit shared by every sample, behind a gradient reversal layer."""

    def __init__(self, init_logit: float = 1.0):
        super().__init__()
        self.global_T = nn.Parameter(torch.full((1,), init_logit))  # reference name and shape, for checkpoints

    def forward(self, grl_scale: float) -> Tensor:
        return _GradientReversal.apply(self.global_T, grl_scale)


def cosine_grl_scale(epoch: int, ramp_epochs: int, lambda_max: float) -> float:
    """The reference's ``CosineDecay(max_value=0, min_value=-lambda_max, num_loops=N).get_value(epoch)`` with the
    1-based epoch: ``(cos(pi*i/N) + 1)/2 * lambda_max - lambda_max``, i clipped to [0, N] (0 -> -lambda_max)."""
    if ramp_epochs <= 0:
        return -lambda_max
    i = min(max(epoch, 0), ramp_epochs)
    return (math.cos(i * math.pi / ramp_epochs) + 1.0) * 0.5 * lambda_max - lambda_max


@register_method("ctkd")
class CTKD(Distiller):
    Config = CTKDConfig

    def build(self) -> None:
        self.temperature_module = GlobalTemperature(self.cfg.init_logit)

    def temperature(self, progress: Progress) -> Tensor:
        """The current temperature (0-dim); its gradient reaches ``global_T`` reversed and scaled by lambda(e)."""
        cfg = self.cfg
        grl_scale = cosine_grl_scale(progress.epoch, cfg.lambda_ramp_epochs, cfg.lambda_max)
        logit = self.temperature_module(grl_scale)
        return (cfg.temperature_min + cfg.temperature_range * torch.sigmoid(logit)).squeeze(0)

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = ce_and_kd(student.logits, None, batch.target, cfg.ce_weight, 0.0)  # CE only: KD uses the learned tau
        # The teacher's tempered probabilities depend on tau too: gradient flows from both sides, as in the reference.
        losses["loss_kd"] = cfg.kd_weight * kd_loss(student.logits, teacher.logits, self.temperature(progress))
        return losses

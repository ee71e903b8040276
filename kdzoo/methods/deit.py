"""DeiT — Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021, arXiv 2012.12877 (docs/methods/deit.md). Reference: facebookresearch/deit
``losses.py`` (``DistillationLoss``): the class token's head learns from the labels, the distillation token's head
from the teacher, ``(1 − α)·CE(class head, y) + α·distill(distillation head)``.

The student is a ViT with a distillation token (timm ``VisionTransformerDistilled``, ``timm:deit_*_distilled_*``).
The method switches on timm's distilled training mode, in which a training forward returns both heads; in eval mode
the network returns their average, so evaluation and the exported student predict as DeiT's do."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import cross_entropy
from kdzoo.methods.registry import register_method
from kdzoo.types import Batch, Progress

DISTILLATION_TYPES = ("hard", "soft")


@dataclass
class DeiTConfig:
    # deit README_deit.md's distillation command (--distillation-type hard), the variant of the paper's DeiT⚗
    # models; main.py's default 'none' trains without a teacher (kdzoo's `vanilla`).
    distillation_type: str = "hard"
    alpha: float = 0.5  # deit main.py --distillation-alpha 0.5 (the paper's 1/2 · CE + 1/2 · distillation)
    tau: float = 1.0  # deit main.py --distillation-tau 1.0; soft distillation only


def soft_distillation(distillation_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """DeiT's soft term: ``KL(p_t ‖ p_s)`` at temperature τ, summed, times τ², divided by the number of *logits*
    (B·K: the "legacy PyTorch behaviour" ``losses.py`` keeps; see deit issue 61), not by the batch as Hinton KD."""
    log_p_s = F.log_softmax(distillation_logits.float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (tau * tau) / distillation_logits.numel()


def hard_distillation(distillation_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard term: cross-entropy against the teacher's arg-max class."""
    return F.cross_entropy(distillation_logits.float(), teacher_logits.argmax(dim=1))


def deit_losses(class_logits: Tensor, distillation_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                cfg: DeiTConfig) -> dict[str, Tensor]:
    """``DistillationLoss`` as two named terms: ``loss_ce = (1 − α)·CE(class head, y)`` and
    ``loss_deit = α·distill(distillation head, teacher)``."""
    if cfg.distillation_type == "soft":
        distillation = soft_distillation(distillation_logits, teacher_logits, cfg.tau)
    else:
        distillation = hard_distillation(distillation_logits, teacher_logits)
    return {
        "loss_ce": (1.0 - cfg.alpha) * cross_entropy(class_logits, target),
        "loss_deit": cfg.alpha * distillation,
    }


@register_method("deit")
class DeiT(Distiller):
    Config = DeiTConfig

    def build(self) -> None:
        cfg = self.cfg
        if cfg.distillation_type not in DISTILLATION_TYPES:
            hint = " ('none' is DeiT without a teacher: method.name=vanilla)" if cfg.distillation_type == "none" else ""
            raise UserInputError(f"method.distillation_type must be one of {DISTILLATION_TYPES}, got "
                                 f"{cfg.distillation_type!r}{hint}")
        if not 0.0 <= cfg.alpha <= 1.0:
            raise UserInputError(f"method.alpha weighs the two heads' losses and must be in [0, 1], got {cfg.alpha}")
        if cfg.tau <= 0:
            raise UserInputError(f"method.tau must be positive, got {cfg.tau}")
        set_distilled_training = getattr(self.student, "set_distilled_training", None)
        if set_distilled_training is None:
            raise UserInputError(
                f"method 'deit' needs a student with a distillation token and head (timm VisionTransformerDistilled, "
                f"e.g. timm:deit_tiny_distilled_patch16_224); {type(self.student).__name__} has none"
            )
        # timm: a training forward then returns (class head, distillation head); eval still averages them.
        set_distilled_training(True)

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_out = self.teacher_forward(batch)
        assert teacher_out is not None
        # The extractor's model, not self.student: it is the compiled network under runtime.compile.
        heads = self.student_extractor.model(batch.image)
        if not isinstance(heads, tuple):
            raise RuntimeError("the DeiT student returned one output: training steps need it in train mode")
        class_logits, distillation_logits = heads
        losses = deit_losses(class_logits, distillation_logits, teacher_out.logits, batch.target, self.cfg)
        # What the network predicts outside training (timm's eval forward): the two heads averaged.
        return (class_logits + distillation_logits) / 2, losses

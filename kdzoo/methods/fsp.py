"""FSP — Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017 (docs/methods/fsp.md). Reference: RepDistiller ``distiller_zoo/FSP.py`` and
``helper/pretrain.py init``.

Two stages, as RepDistiller runs them: an init stage (30 epochs, constant base lr) trains the student's
feature extractor (no classifier) to match the teacher's FSP matrices; the main stage is plain cross-entropy
(RepDistiller's loop sets ``loss_kd = 0`` for FSP, so its ``-b 50`` is inert) and needs no teacher forward
unless ``kd_weight`` is set. The FSP matrices are batched matmuls: RepDistiller's broadcast product
materialises a [B, C_top, C_bot, H*W] tensor (512 MiB for each of resnet8x4's pairs at batch 64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.errors import UserInputError
from kdzoo.methods.init_stage import BodyInitDistiller
from kdzoo.methods.losses import pooled_pair_terms
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs


@dataclass
class FSPConfig:
    init_epochs: int = 30  # RepDistiller train_student.py --init_epochs 30
    init_lr: float | None = None  # None = the base lr, as RepDistiller helper/pretrain.py (opt.learning_rate)
    ce_weight: float = 1.0  # RepDistiller scripts/run_cifar_distill.sh -r 1 (main stage)
    kd_weight: float = 0.0  # RepDistiller -a 0 (main stage)
    temperature: float = 4.0  # RepDistiller --kd_T 4 (only used when kd_weight > 0)


def fsp_matrices(feats: Sequence[Tensor]) -> list[Tensor]:
    """``G[b, j, i] = mean_hw top[b, j, hw] * bottom[b, i, hw]`` for consecutive maps (bottom, top), the larger
    map average-pooled to the smaller one's size first (RepDistiller ``FSP.compute_fsp``); [B, C_top, C_bottom],
    fp32."""

    def gram(bottom: Tensor, top: Tensor) -> Tensor:
        bottom, top = bottom.flatten(2), top.flatten(2)
        return torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[-1]

    return pooled_pair_terms(feats[:-1], feats[1:], gram)


def fsp_loss_terms(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> list[Tensor]:
    """RepDistiller ``FSP.forward``: per pair of consecutive maps, the mean squared difference of the FSP matrices."""
    return [(s - t).pow(2).mean() for s, t in zip(fsp_matrices(student_feats), fsp_matrices(teacher_feats))]


@register_method("fsp")
class FSP(BodyInitDistiller):
    Config = FSPConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)
    init_trainable = ("student_body",)
    main_trainable = ("student",)

    def build(self) -> None:
        super().build()
        s_channels = [f.shape[1] for f in self.probe_student().feats]
        t_channels = [f.shape[1] for f in self.probe_teacher().feats]
        if s_channels != t_channels:  # RepDistiller raises too: FSP compares Gram matrices entry by entry
            raise UserInputError(
                f"fsp needs the same channel count at every tap of student and teacher (stem and each stage); got "
                f"student {s_channels}, teacher {t_channels}. Pick a pair with equal widths (e.g. resnet32x4 -> "
                "resnet8x4, resnet56 -> resnet20, vgg13 -> vgg8, wrn_40_2 -> wrn_16_2)")

    def init_losses(self, student: Outputs, teacher: Outputs) -> dict[str, Tensor]:
        return {"loss_fsp": sum(fsp_loss_terms(student.feats, teacher.feats))}

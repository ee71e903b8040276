"""FSP — Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017 (methods.md §15). Reference: RepDistiller ``distiller_zoo/FSP.py`` and
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
from kdzoo.methods.base import Distiller
from kdzoo.types import INIT_STAGE, MAIN_STAGE, Batch, Progress, Stage
from kdzoo.methods.losses import at_least_fp32, autocast_off, feature_body, pool_to_smaller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs


@dataclass
class FSPConfig:
    init_epochs: int = 30  # RD train_student.py --init_epochs 30
    init_lr: float | None = None  # None = the base lr, as RD helper/pretrain.py (opt.learning_rate)
    ce_weight: float = 1.0  # RD scripts/run_cifar_distill.sh -r 1 (main stage)
    kd_weight: float = 0.0  # RD -a 0 (main stage)
    temperature: float = 4.0  # RD --kd_T 4 (only used when kd_weight > 0)


def fsp_matrices(feats: Sequence[Tensor]) -> list[Tensor]:
    """``G[b, j, i] = mean_hw top[b, j, hw] * bottom[b, i, hw]`` for consecutive maps (bottom, top), the larger
    map average-pooled to the smaller one's size first (RD ``FSP.compute_fsp``); [B, C_top, C_bottom], fp32."""
    grams = []
    with autocast_off(feats[0]):
        for bottom, top in zip(feats[:-1], feats[1:]):
            bottom, top = pool_to_smaller(bottom, top)
            bottom, top = at_least_fp32(bottom).flatten(2), at_least_fp32(top).flatten(2)
            grams.append(torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[-1])
    return grams


def fsp_loss_terms(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> list[Tensor]:
    """RD ``FSP.forward``: per pair of consecutive maps, the mean squared difference of the FSP matrices."""
    return [(s - t).pow(2).mean() for s, t in zip(fsp_matrices(student_feats), fsp_matrices(teacher_feats))]


@register_method("fsp")
class FSP(Distiller):
    Config = FSPConfig
    declared_stages = (INIT_STAGE, MAIN_STAGE)
    parameter_sets = ("student_body",)
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def build(self) -> None:
        s_channels = [f.shape[1] for f in self.probe_student().feats]
        t_channels = [f.shape[1] for f in self.probe_teacher().feats]
        if s_channels != t_channels:  # RD raises too: FSP compares Gram matrices entry by entry
            raise UserInputError(
                f"fsp needs the same channel count at every tap of student and teacher (stem and each stage); got "
                f"student {s_channels}, teacher {t_channels}. Pick a pair with equal widths (e.g. resnet32x4 -> "
                "resnet8x4, resnet56 -> resnet20, vgg13 -> vgg8, wrn_40_2 -> wrn_16_2)")
        # The student without its classifier (RD get_feat_modules), trained in the init stage; a view, not a child.
        object.__setattr__(self, "student_body", feature_body(self.student))

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        init = Stage(name=INIT_STAGE, epochs=cfg.init_epochs, trainable=("student_body",), lr=cfg.init_lr,
                     use_schedule=False)
        main = Stage(name=MAIN_STAGE, trainable=("student",))
        return [init, main] if cfg.init_epochs > 0 else [main]

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        if progress.stage == INIT_STAGE:
            assert teacher is not None
            return {"loss_fsp": sum(fsp_loss_terms(student.feats, teacher.feats))}
        teacher_logits = teacher.logits if teacher is not None else None
        return self.ce_and_kd(student.logits, teacher_logits, batch.target)

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        if progress.stage == INIT_STAGE or self.cfg.kd_weight:
            return super().training_step(batch, progress)
        # Main stage without KD: RD still runs the teacher, but nothing reads its outputs.
        student_out = self.student_extractor(batch.image)
        return student_out.logits, self.compute_losses(student_out, None, batch, progress)

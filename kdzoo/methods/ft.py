"""FT — Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018,
arXiv 1802.04977 (docs/methods/ft.md). Reference: RepDistiller ``distiller_zoo/FT.py FactorTransfer``,
``models/util.py Paraphraser, Translator`` and ``helper/pretrain.py init``.

Two stages, as RepDistiller runs them: an init stage (30 epochs, constant lr) trains only the paraphraser, an
autoencoder of the teacher's last map; the main stage trains student + translator on CE + the factor loss with
the paraphraser frozen. RepDistiller's factor is an attention map of the factor (channel mean of its square,
L2-normalised), not the paper's normalised factor vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.methods.init_stage import InitStageDistiller
from kdzoo.methods.losses import at_least_fp32, pool_to_smaller
from kdzoo.methods.registry import register_method
from kdzoo.models.cifar.resnet import CifarResNet
from kdzoo.models.cifar.wrn import WideResNet
from kdzoo.models.taps import Outputs
from kdzoo.types import INIT_STAGE, Batch, Progress


@dataclass
class FTConfig:
    ft_weight: float = 200.0  # RepDistiller scripts/run_cifar_distill.sh -b 200
    # RepDistiller models/util.py Paraphraser/Translator k=0.5 (the paper's paraphrase rate)
    paraphrase_rate: float = 0.5
    init_epochs: int = 30  # RepDistiller train_student.py --init_epochs 30
    # None = RepDistiller helper/pretrain.py rule: 0.01 for CIFAR ResNet/WRN students, else base lr
    init_lr: float | None = None
    ce_weight: float = 1.0  # RepDistiller -r 1
    kd_weight: float = 0.0  # RepDistiller -a 0
    temperature: float = 4.0  # RepDistiller --kd_T 4 (only used when kd_weight > 0)


def _conv_stack(channels: list[int], batch_norm: bool, transposed: bool = False) -> nn.Sequential:
    """RepDistiller's conv3x3 (+ BN or an empty slot, keeping RepDistiller's state_dict indices) + LeakyReLU(0.1)
    chains."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller ``Paraphraser`` (teacher side, no BN): encoder C -> C -> kC -> kC, decoder kC -> kC -> C -> C."""

    def __init__(self, channels: int, rate: float):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _conv_stack([channels, channels, factor, factor], batch_norm=False)
        self.decoder = _conv_stack([factor, factor, channels, channels], batch_norm=False, transposed=True)


class Translator(nn.Module):
    """RepDistiller ``Translator`` (student side, BN): C_s -> C_s -> int(k C_t) -> int(k C_t)."""

    def __init__(self, student_channels: int, teacher_channels: int, rate: float):
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = _conv_stack([student_channels, student_channels, factor, factor], batch_norm=True)


def factor_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """RepDistiller ``FactorTransfer`` (p1 = 2, p2 = 1): mean |a(F_s) - a(F_t)| with ``a(F) = normalize(mean_c
    F^2)``."""
    student_factor, teacher_factor = pool_to_smaller(at_least_fp32(student_factor), at_least_fp32(teacher_factor))

    def attention(factor: Tensor) -> Tensor:
        return F.normalize(factor.pow(2).mean(1).flatten(1))

    return (attention(student_factor) - attention(teacher_factor)).abs().mean()


@register_method("ft")
class FT(InitStageDistiller):
    Config = FTConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)
    init_trainable = ("paraphraser",)
    main_trainable = ("student", "translator")  # RepDistiller never steps the paraphraser again

    def build(self) -> None:
        s_channels, t_channels = self.probe_student().feats[-1].shape[1], self.probe_teacher().feats[-1].shape[1]
        # RepDistiller builds the paraphraser first (seeded runs then draw the same initial weights).
        self.paraphraser = Paraphraser(t_channels, self.cfg.paraphrase_rate)
        self.translator = Translator(s_channels, t_channels, self.cfg.paraphrase_rate)

    def init_stage_lr(self) -> float | None:
        if self.cfg.init_lr is None and isinstance(self.student, (CifarResNet, WideResNet)):
            return 0.01  # RepDistiller helper/pretrain.py: lr 0.01 for factor when the student is a resnet*/wrn_*
        return self.cfg.init_lr

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        teacher_map = teacher.feats[-1]
        if progress.stage == INIT_STAGE:
            reconstruction = self.paraphraser.decoder(self.paraphraser.encoder(teacher_map))
            return {"loss_ft_reconstruction": F.mse_loss(at_least_fp32(reconstruction), at_least_fp32(teacher_map))}
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        # RepDistiller lets gradients reach the (frozen, never stepped) paraphraser; not computing them changes nothing.
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher_map)
        losses["loss_ft"] = cfg.ft_weight * factor_loss(self.translator.encoder(student.feats[-1]), teacher_factor)
        return losses

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        if progress.stage != INIT_STAGE:
            return super().training_step(batch, progress)
        # RepDistiller init(): the student runs in eval mode and takes no part in the loss; only its logits are
        # returned.
        teacher_out = self.teacher_forward(batch)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            student_out = self.student_extractor(batch.image)
        self.student.train(was_training)
        return student_out.logits, self.compute_losses(student_out, teacher_out, batch, progress)

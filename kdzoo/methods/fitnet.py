"""FitNet — Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv 1412.6550 (docs/methods/fitnet.md).

Reference: RepDistiller ``distiller_zoo/FitNet.py`` (``HintLoss`` = MSE) with the ``models/util.py``
``ConvReg`` regressor on the student's hint map. RepDistiller and mdistiller train in one stage; the
paper's hint pre-training (stage 1: the student up to the hint layer plus the regressor, on the hint
loss alone) is opt-in through ``hint_stage_epochs``.

Detection: the hint is the FPN output (``fpn_levels``: the levels' names, torchvision's ``'0'..'3', 'pool'``; default
every level), as FitNet-on-detection baselines distil the neck: LutingWang/HEAD ``configs/kd/fitnet.py`` puts one 1x1
conv adapter (256 -> 256) on each of the five FPN levels and an MSE to the teacher's level. Here likewise one 1x1 conv
per level (no BatchNorm / ReLU: FPN levels are signed conv outputs, unlike the post-ReLU maps ``ConvReg`` targets), the
per-level MSEs summed, times ``feat_weight`` (the CIFAR 100 is no detection value: HEAD weighs it 1), added to the
detector's own losses (``ce_weight``). A student level whose size differs from the teacher's (the two transforms
resize differently) is resized bilinearly after its conv. The hint stage trains the student's backbone (body + FPN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32
from kdzoo.methods.registry import register_method
from kdzoo.methods.reviewkd import drop_taps, probe_fpn_levels
from kdzoo.models.taps import Outputs, features
from kdzoo.types import CLASSIFICATION, DETECTION, MAIN_STAGE, SEGMENTATION, Batch, Progress, Stage


@dataclass
class FitNetConfig:
    hint_layer: int = 2  # RepDistiller train_student.py --hint_layer 2 (mdistiller FITNET.HINT_LAYER 2; SimKD uses 1)
    # RepDistiller scripts/run_cifar_distill.sh -b 100 (mdistiller FITNET.LOSS.FEAT_WEIGHT 100)
    feat_weight: float = 100.0
    ce_weight: float = 1.0  # RepDistiller -r 1 (mdistiller FITNET.LOSS.CE_WEIGHT 1)
    kd_weight: float = 0.0  # RepDistiller -a 0 (SimKD -d 1 adds KD)
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0
    # Paper §2.2 / TensorFlow port: hint pre-training before the main run (TensorFlow port: 30% of the epochs). 0 =
    # RepDistiller/mdistiller single stage.
    hint_stage_epochs: int = 0
    # Detection only: the FPN levels hinted, by name (None = all, as LutingWang/HEAD configs/kd/fitnet.py).
    fpn_levels: list[str] | None = None


class ConvReg(nn.Module):
    """RepDistiller ``models/util.py`` ``ConvReg``: maps a student map [C_s,H_s,W_s] to the teacher's
    [C_t,H_t,W_t] with a conv chosen by the spatial ratio, then BatchNorm and (optionally) ReLU.
    PyTorch default init, conv bias on, as the reference."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, s_channels, s_height, s_width = student_shape
        _, t_channels, t_height, t_width = teacher_shape
        if s_height == 2 * t_height:
            self.conv: nn.Module = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
        elif 2 * s_height == t_height:
            self.conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
        elif s_height >= t_height:
            kernel = (1 + s_height - t_height, 1 + s_width - t_width)
            self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=kernel)
        else:
            raise UserInputError(
                f"ConvReg cannot map a {s_height}x{s_width} student map to a {t_height}x{t_width} teacher map "
                "(RepDistiller supports H_s = 2H_t, 2H_s = H_t or H_s >= H_t); choose another hint layer"
            )
        self.bn = nn.BatchNorm2d(t_channels)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


HINT_STAGE = "hint"


@register_method("fitnet")
class FitNet(Distiller):
    supported_tasks = (CLASSIFICATION, SEGMENTATION, DETECTION)
    Config = FitNetConfig
    declared_stages = (HINT_STAGE, MAIN_STAGE)
    # Paper stage 1 trains only the student layers the hint depends on (W_Guided) and the regressor.
    parameter_sets = ("hint_trunk",)
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def build(self) -> None:
        if self.task.name == DETECTION:
            self.build_detection()
            return
        hint = self.cfg.hint_layer
        student_feats, teacher_feats = self.probe_student().feats, self.probe_teacher().feats
        if not (0 <= hint < min(len(student_feats), len(teacher_feats))):
            raise UserInputError(
                f"fitnet.hint_layer={hint} is out of range: student has {len(student_feats)} feature maps, "
                f"teacher {len(teacher_feats)}"
            )
        self.regressor = ConvReg(student_feats[hint].shape, teacher_feats[hint].shape)

    def build_detection(self) -> None:
        """One 1x1 conv per hinted FPN level, student width -> teacher width (PyTorch default init)."""
        assert self.teacher is not None
        drop_taps(self)
        student_levels, teacher_levels = probe_fpn_levels(self.student), probe_fpn_levels(self.teacher)
        common = [name for name in student_levels if name in teacher_levels]
        names = common if self.cfg.fpn_levels is None else list(self.cfg.fpn_levels)
        unknown = [name for name in names if name not in common]
        if unknown or not names:
            raise UserInputError(f"fitnet.fpn_levels={names}: the FPN levels both detectors have are {common}")
        self.regressor = nn.ModuleDict(
            {name: nn.Conv2d(student_levels[name][1], teacher_levels[name][1], kernel_size=1) for name in names})

    def stages(self) -> list[Stage]:
        if self.cfg.hint_stage_epochs <= 0:
            return [Stage()]
        # Constant lr during hint training, as RepDistiller's own init phases (helper/pretrain.py).
        hint = Stage(HINT_STAGE, epochs=self.cfg.hint_stage_epochs, trainable=("hint_trunk", "regressor"),
                     use_schedule=False)
        return [hint, Stage()]

    def parameter_set(self, name: str) -> list[nn.Parameter]:
        return self.hint_trunk_parameters() if name == "hint_trunk" else super().parameter_set(name)

    def hint_trunk_parameters(self) -> list[nn.Parameter]:
        """Student parameters the hint map depends on, found from the autograd graph of one eval-mode
        dry run (architecture-agnostic; eval mode leaves BatchNorm statistics untouched)."""
        if self.task.name == DETECTION:  # every FPN level depends on the whole body (top-down path) and the FPN
            return [p for p in self.student.backbone.parameters() if p.requires_grad]
        params = [p for p in self.student.parameters() if p.requires_grad]
        was_training = self.student.training
        self.student.eval()
        try:
            x = torch.zeros(2, *self.input_shape, device=params[0].device, dtype=params[0].dtype)
            with torch.enable_grad():
                hint = features(self.student, x, ("feats",)).feats[self.cfg.hint_layer]
                grads = torch.autograd.grad(hint.sum(), params, allow_unused=True)
        finally:
            self.student.train(was_training)
        return [p for p, g in zip(params, grads, strict=True) if g is not None]

    def hint_loss(self, student: Outputs, teacher: Outputs) -> Tensor:
        if self.task.name == DETECTION:
            return self.fpn_hint_loss(student.detector.fpn, teacher.detector.fpn)
        hint = self.cfg.hint_layer
        regressed = self.regressor(student.feats[hint])
        return F.mse_loss(at_least_fp32(regressed), at_least_fp32(teacher.feats[hint]))

    def fpn_hint_loss(self, student_fpn: dict[str, Tensor], teacher_fpn: dict[str, Tensor]) -> Tensor:
        """Sum over the hinted levels of MSE(conv1x1(student level), teacher level)."""
        terms = []
        for name, regressor in self.regressor.items():
            regressed, target = regressor(student_fpn[name]), teacher_fpn[name]
            if regressed.shape[-2:] != target.shape[-2:]:
                regressed = F.interpolate(regressed, size=target.shape[-2:], mode="bilinear", align_corners=False)
            terms.append(F.mse_loss(at_least_fp32(regressed), at_least_fp32(target)))
        return torch.stack(terms).sum()

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        loss_hint = cfg.feat_weight * self.hint_loss(student, teacher)
        if progress.stage == HINT_STAGE:
            return {"loss_fitnet": loss_hint}
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target, student=student)
        losses["loss_fitnet"] = loss_hint
        return losses

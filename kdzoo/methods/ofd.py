"""OFD — Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019, arXiv 1904.01866
(docs/methods/ofd.md). Reference: mdistiller ``distillers/OFD.py`` (cross-checked against the official
clovaai/overhaul-distillation ``distiller.py``). The teacher runs in train mode, as in both: its
pre-ReLU features use batch statistics and its BatchNorm running statistics move every step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs, bn_before_relu
from kdzoo.types import CLASSIFICATION, INIT_STAGE, MAIN_STAGE, SEGMENTATION, Batch, Progress, Stage


@dataclass
class OFDConfig:
    ce_weight: float = 1.0  # mdistiller configs/cifar100/ofd.yaml OFD.LOSS.CE_WEIGHT 1.0
    kd_weight: float = 0.0  # mdistiller's OFD adds no KD term
    # mdistiller OFD.LOSS.FEAT_WEIGHT 1e-3 (overhaul-distillation CIFAR: loss.sum()/B/1000); ImageNet 1e-4
    feat_weight: float = 1e-3
    temperature: float = 4.0  # KD temperature, used only when kd_weight > 0 (RepDistiller --kd_T 4)
    connector_kernel_size: int = 1  # mdistiller OFD.CONNECTOR.KERNEL_SIZE 1
    # Divisor of each distilled stage's term, shallowest first; null = 2^(N-1-i) (mdistiller / the CIFAR code:
    # last stage 1, then 2, 4). Segmentation: overhaul-distillation Segmentation/distiller.py loss_divider
    # [8, 4, 2, 1, 1, 16] for the four backbone stages, ASPP and decoder.
    stage_divisors: list[float] | None = None
    # Epochs at the start that train only the connectors (0 = none, mdistiller). overhaul-distillation
    # Segmentation/train_with_distillation.py: 1 (its epoch 0 steps an optimiser holding only the connectors).
    connector_init_epochs: int = 0


def margin_from_bn(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel E[x | x < 0] for x ~ N(β, γ²) (paper Eq. 3), from the BN feeding the teacher's ReLU;
    ``-3|γ|`` where P(x < 0) <= 1e-3. Computed in float64 (the reference uses Python floats and scipy),
    returned as float32 like the reference's ``FloatTensor``."""
    std = bn.weight.detach().double().abs()
    mean = bn.bias.detach().double()
    ratio = mean / std
    cdf_neg = 0.5 * torch.erfc(ratio / math.sqrt(2.0))  # Φ(-m/s)
    pdf = torch.exp(-0.5 * ratio**2) / math.sqrt(2.0 * math.pi)  # φ(m/s)
    margin = torch.where(cdf_neg > 1e-3, mean - std * pdf / cdf_neg, -3.0 * std)
    return margin.float()


class _PartialL2(torch.autograd.Function):
    """sum((s - t')^2 where kept) with its gradient 2 (s - t') where kept, in three passes over the map
    forward and one backward (autograd of the where/pow/sum chain takes about three times as many; OFD's
    maps are the largest pre-ReLU tensors of the network)."""

    @staticmethod
    def forward(ctx, student: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        kept = student - target
        kept.mul_((kept > 0) | (target > 0))
        ctx.save_for_backward(kept)
        return torch.linalg.vector_norm(kept).square()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (kept,) = ctx.saved_tensors
        return kept * (2 * grad), None


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Paper Eq. 4 with the margin-ReLU target t' = max(t, margin): (s - t')^2 where s > t' or t' > 0,
    summed over C,H,W and averaged over the batch. Equal to mdistiller's three-case ``feat_loss``
    because every margin is <= 0. The teacher side carries no gradient (the teacher is frozen)."""
    target = torch.maximum(teacher.detach(), margin.view(1, -1, 1, 1))
    return _PartialL2.apply(student, target) / student.shape[0]


@register_method("ofd")
class OFD(Distiller):
    supported_tasks = (CLASSIFICATION, SEGMENTATION)
    Config = OFDConfig
    teacher_taps = ("preact",)
    student_taps = ("preact",)
    teacher_train_mode = True
    declared_stages = (INIT_STAGE, MAIN_STAGE)

    def build(self) -> None:
        assert self.teacher is not None
        student_maps, teacher_maps = self.probe_student().preact[1:], self.probe_teacher().preact[1:]
        margins = [margin_from_bn(bn) for bn in bn_before_relu(self.teacher)]
        if [m.numel() for m in margins] != [f.shape[1] for f in teacher_maps]:
            raise ValueError(
                f"{type(self.teacher).__name__}: bn_before_relu channels {[m.numel() for m in margins]} do not match "
                f"its pre-activation stages {[f.shape[1] for f in teacher_maps]}"
            )
        # mdistiller keeps the last min(L_s, L_t) stages of each side (``_align_list``); the margins
        # follow the teacher stages actually used.
        self.num_stages = min(len(student_maps), len(teacher_maps))
        student_channels = [f.shape[1] for f in student_maps[-self.num_stages:]]
        teacher_channels = [f.shape[1] for f in teacher_maps[-self.num_stages:]]
        k = self.cfg.connector_kernel_size
        self.connectors = nn.ModuleList(
            self._connector(cs, ct, k) for cs, ct in zip(student_channels, teacher_channels, strict=True)
        )
        # Buffers (mdistiller keeps a Python list): they follow .to(device) and land in checkpoints.
        for i, margin in enumerate(margins[-self.num_stages:]):
            self.register_buffer(f"margin{i}", margin)
        divisors = self.cfg.stage_divisors
        if divisors is None:
            divisors = [2.0 ** (self.num_stages - 1 - i) for i in range(self.num_stages)]
        if len(divisors) != self.num_stages or any(d <= 0 for d in divisors):
            raise UserInputError(
                f"method.stage_divisors needs {self.num_stages} positive values (one per distilled stage), got "
                f"{list(divisors)}"
            )
        self.stage_divisors = [float(d) for d in divisors]

    def stages(self) -> list[Stage]:
        if self.cfg.connector_init_epochs <= 0:
            return [Stage()]
        # The official init epoch runs under the same poly schedule as the rest (its LR_Scheduler counts every
        # iteration from the first) and at the base lr: a one-group optimiser gets no 10x (docs/methods/ofd.md).
        init = Stage(INIT_STAGE, epochs=self.cfg.connector_init_epochs, trainable=("connectors",), scale_groups=False)
        return [init, Stage()]

    @staticmethod
    def _connector(student_channels: int, teacher_channels: int, kernel_size: int) -> nn.Sequential:
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * teacher_channels)))
        return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))  # BN γ=1, β=0: PyTorch's default

    @property
    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.num_stages)]

    def stage_losses(self, student_preact: list[Tensor], teacher_preact: list[Tensor]) -> list[Tensor]:
        """Unweighted partial L2 of every distilled stage (mdistiller's ``feat_loss`` values)."""
        n = self.num_stages
        losses = []
        pairs = zip(self.connectors, self.margins, student_preact[-n:], teacher_preact[-n:], strict=True)
        for connector, margin, fs, ft in pairs:
            source = connector(fs).float()
            if ft.shape[-2:] != source.shape[-2:]:
                ft = F.adaptive_avg_pool2d(ft, source.shape[-2:])
            losses.append(partial_l2(source, ft.float(), margin))
        return losses

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        stage_terms = self.stage_losses(student.preact[1:], teacher.preact[1:])
        losses["loss_ofd"] = cfg.feat_weight * sum(
            term / divisor for term, divisor in zip(stage_terms, self.stage_divisors, strict=True)
        )
        return losses

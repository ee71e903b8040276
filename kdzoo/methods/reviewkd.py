"""ReviewKD — Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv 2104.09044
(methods.md §17). Reference: mdistiller ``distillers/ReviewKD.py`` (``ReviewKD``, ``ABF``, ``hcl_loss``).

Student levels (the last stages + the pooled vector as a 1x1 map) are fused deep -> shallow by attention-based
fusion (ABF) modules; every fused output is compared with the teacher's pre-ReLU stage map (or pooled vector)
of the same level by the hierarchical context loss. Level sizes are read from the tensors at run time (the
reference's SHAPES / OUT_SHAPES / IN_CHANNELS / OUT_CHANNELS config lists are what the probes give).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Batch, Distiller, Progress
from kdzoo.methods.losses import at_least_fp32, cross_entropy, warmup_factor
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import FeatureExtractor, Outputs


@dataclass
class ReviewKDConfig:
    reviewkd_weight: float = 5.0  # MD configs/cifar100/reviewkd.yaml REVIEWKD.REVIEWKD_WEIGHT (cfg.py default 1.0)
    warmup_epochs: int = 20  # MD REVIEWKD.WARMUP_EPOCHS, 1-based epoch (ImageNet: 1)
    max_mid_channel: int = 512  # MD ReviewKD.py: mid = min(512, in_channels[-1]) (cfg MAX_MID_CHANNEL is ignored)
    student_preact: bool = False  # MD REVIEWKD.STU_PREACT (CIFAR False, ImageNet True)
    ce_weight: float = 1.0  # MD REVIEWKD.CE_WEIGHT


class ABF(nn.Module):
    """MD ``ABF``: 1x1 conv+BN to the mid width, attention fusion with the deeper level's residual (all but
    the deepest level), 3x3 conv+BN to the teacher's width. Returns (output, residual for the next level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.att_conv(torch.cat([x, residual], dim=1))  # per-pixel weights of the two inputs
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_terms(student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> list[Tensor]:
    """MD ``hcl_loss`` per level: MSE plus MSEs of 4x4 / 2x2 / 1x1 average pools (those smaller than the map),
    weighted 1/2, 1/4, 1/8 in order of use, divided by the sum of the weights."""
    terms = []
    for s, t in zip(student_levels, teacher_levels):
        s, t = at_least_fp32(s), at_least_fp32(t)
        loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            total += weight
        terms.append(loss / total)
    return terms


def _levels(maps: Sequence[Tensor], pooled: Tensor) -> list[Tensor]:
    return [*maps, pooled[:, :, None, None]]


@register_method("reviewkd")
class ReviewKD(Distiller):
    Config = ReviewKDConfig
    teacher_taps = ("preact", "pooled")
    student_taps = ("feats", "pooled")

    def build(self) -> None:
        if self.cfg.student_preact:  # MD's ImageNet recipes read the student's pre-ReLU maps
            self.student_extractor.remove()
            self.student_taps = ("preact", "pooled")
            self.student_extractor = FeatureExtractor(self.student, self.student_taps)
        teacher_levels = self.teacher_levels(self.probe_teacher())
        student_levels = self.student_levels(self.probe_student(), len(teacher_levels))
        in_channels = [f.shape[1] for f in student_levels]
        mid_channels = min(self.cfg.max_mid_channel, in_channels[-1])
        count = len(in_channels)
        # Built shallow -> deep as MD does (same RNG draws), stored deepest first (MD's ``abfs[::-1]``).
        abfs = [ABF(c_in, mid_channels, t.shape[1], fuse=i < count - 1)
                for i, (c_in, t) in enumerate(zip(in_channels, teacher_levels))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def teacher_levels(self, teacher: Outputs) -> list[Tensor]:
        """MD: the teacher's pre-ReLU stage maps and its pooled vector."""
        assert teacher.pooled is not None
        return _levels(teacher.preact[1:], teacher.pooled)

    def student_levels(self, student: Outputs, count: int) -> list[Tensor]:
        """MD: the student's last ``count`` levels of [stem, stages..., pooled] (its zip drops the rest)."""
        assert student.pooled is not None
        levels = _levels(student.preact if self.cfg.student_preact else student.feats, student.pooled)
        if len(levels) < count:
            raise UserInputError(f"reviewkd needs {count} student levels (the teacher's stages + pooled), but "
                                 f"{type(self.student).__name__} has only {len(levels)}")
        return levels[-count:]

    def review(self, student_levels: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The ABF chain, deepest level first; returns the outputs shallowest first (as the teacher levels)."""
        outputs: list[Tensor] = []
        residual = None
        for abf, level, size in zip(self.abfs, reversed(student_levels), reversed(out_sizes)):
            out, residual = abf(level, residual, size)
            outputs.append(out)
        return outputs[::-1]

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        teacher_levels = self.teacher_levels(teacher)
        outputs = self.review(self.student_levels(student, len(teacher_levels)),
                              [t.shape[-2:] for t in teacher_levels])
        ramp = warmup_factor(progress.epoch, cfg.warmup_epochs)
        return {
            "loss_ce": cfg.ce_weight * cross_entropy(student.logits, batch.target),
            "loss_reviewkd": cfg.reviewkd_weight * ramp * sum(hcl_terms(outputs, teacher_levels)),
        }

"""Logit standardization — Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
arXiv 2403.01427 (docs/methods/logit_std.md). Reference: sunshangquan/logit-standardization-KD (an mdistiller fork):
``normalize`` in ``mdistiller/distillers/KD.py`` / ``DKD.py`` and the ``--logit-stand --base-temp 2 --kd-weight 9``
overrides in ``tools/train.py``.

A plug-in pre-process: each sample's teacher and student logits are Z-scored separately before the usual KD / DKD
loss (the cross-entropy still sees the raw student logits). ``kd_ls`` and ``dkd_ls`` reuse kdzoo's KD and DKD losses.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.dkd import DKD
from kdzoo.methods.losses import at_least_fp32, cross_entropy, kd_loss
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, Batch, Progress


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """``(z - mean(z)) / (eps + std(z))`` per sample with the unbiased std (``Tensor.std`` default), >= fp32."""
    logits = at_least_fp32(logits)
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


@dataclass
class KDLSConfig:
    temperature: float = 2.0  # LS README CIFAR KD+LS: --base-temp 2 (tools/train.py sets KD.TEMPERATURE)
    ce_weight: float = 1.0  # LS mdistiller/engine/cfg.py KD.LOSS.CE_WEIGHT 1
    kd_weight: float = 9.0  # LS README: --kd-weight 9 (tools/train.py sets KD.LOSS.KD_WEIGHT)


@register_method("kd_ls")
class KDLogitStandardization(Distiller):
    Config = KDLSConfig

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        kd = kd_loss(standardize_logits(student.logits), standardize_logits(teacher.logits), cfg.temperature)
        return {
            "loss_ce": cfg.ce_weight * cross_entropy(student.logits, batch.target),
            "loss_kd": cfg.kd_weight * kd,
        }


@dataclass
class DKDLSConfig:
    # LS tools/train.py for DKD: ALPHA *= kd_weight, BETA *= kd_weight, DKD.T = base_temp, with mdistiller's
    # res32x4_res8x4 DKD config (alpha 1, beta 8) and --kd-weight 9 --base-temp 2 from the LS README.
    alpha: float = 9.0  # 1 * 9
    beta: float = 72.0  # 8 * 9
    temperature: float = 2.0  # --base-temp 2
    warmup_epochs: int = 20  # mdistiller DKD.WARMUP 20 (unchanged by LS)
    ce_weight: float = 1.0  # mdistiller DKD.CE_WEIGHT 1


@register_method("dkd_ls")
class DKDLogitStandardization(DKD):
    """DKD's loss on Z-scored logits (the cross-entropy keeps the raw ones)."""

    Config = DKDLSConfig
    supported_tasks = (CLASSIFICATION,)  # DKD's detection setting has no logit-standardised counterpart

    def distilled_logits(self, logits: Tensor) -> Tensor:
        return standardize_logits(logits)

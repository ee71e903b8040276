"""VID — Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019,
arXiv 1904.05835 (docs/methods/vid.md). Reference: RepDistiller ``distiller_zoo/VID.py`` (``VIDLoss``) as
wired in ``train_student.py`` / ``helper/loops.py``. RepDistiller trains the per-channel variance
parameter (it is in the optimiser, with weight decay); mdistiller never registers it, so σ² stays 5
there. We follow RepDistiller."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import align_spatial
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class VIDConfig:
    ce_weight: float = 1.0  # RepDistiller scripts/run_cifar_distill.sh -r 1
    kd_weight: float = 0.0  # RepDistiller -a 0 (SimKD's VID row adds KD with weight 1)
    feat_weight: float = 1.0  # RepDistiller -b 1 (mdistiller VID.LOSS.FEAT_WEIGHT 1.0)
    temperature: float = 4.0  # RepDistiller --kd_T 4; used only when kd_weight > 0
    init_pred_var: float = 5.0  # RepDistiller VIDLoss(init_pred_var=5.0) (mdistiller VID.INIT_PRED_VAR 5.0)
    eps: float = 1e-5  # RepDistiller VIDLoss(eps=1e-5) (mdistiller VID.EPS 1e-5)


class VIDStage(nn.Module):
    """Gaussian q(t | s) of one stage: mean μ(s) from three 1x1 convs, per-channel variance
    σ² = softplus(log_scale) + eps (paper Eq. 4-5). Attribute names and registration order are
    RepDistiller's (``log_scale`` before ``regressor``), so its state_dict loads unchanged."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        # Inverse softplus of (init_pred_var - eps), so that σ² = init_pred_var at step 0.
        self.log_scale = nn.Parameter(torch.full((out_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        # Pool the larger map to the smaller one (RepDistiller pools to a square of the smaller height).
        student_feat, teacher_feat = align_spatial(student_feat, teacher_feat)
        pred_mean = self.regressor(student_feat).float()
        pred_var = (F.softplus(self.log_scale.float()) + self.eps).view(1, -1, 1, 1)
        # mean_{b,c,h,w} ½[(μ - t)²/σ²_c + log σ²_c]; the log term is constant over b,h,w, so its
        # mean is the channel mean (no full-size broadcast of log σ²).
        squared_error = (pred_mean - teacher_feat.float()).pow(2) / pred_var
        return 0.5 * (squared_error.mean() + pred_var.log().mean())


@register_method("vid")
class VID(Distiller):
    Config = VIDConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def build(self) -> None:
        cfg = self.cfg
        # RepDistiller zips feats[1:] of both sides: the first min(L_s, L_t) stages; mid = C_t.
        pairs = zip(self.probe_student().feats[1:], self.probe_teacher().feats[1:], strict=False)
        self.regressors = nn.ModuleList(
            VIDStage(fs.shape[1], ft.shape[1], ft.shape[1], cfg.init_pred_var, cfg.eps) for fs, ft in pairs
        )

    def stage_losses(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> list[Tensor]:
        """Unweighted negative log-likelihood of every distilled stage (RepDistiller's ``loss_group``)."""
        pairs = zip(self.regressors, student_feats[1:], teacher_feats[1:], strict=False)
        return [stage(fs, ft) for stage, fs, ft in pairs]

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        losses["loss_vid"] = cfg.feat_weight * sum(self.stage_losses(student.feats, teacher.feats))
        return losses

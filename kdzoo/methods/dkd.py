"""DKD — Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv 2203.08679 (docs/methods/dkd.md).
Reference: mdistiller ``distillers/DKD.py``. The student's binary log-probabilities are computed
with log-sum-exp instead of ``log`` of a softmax sum (same value in fp32, no -inf when p_y -> 1).

Detection (mdistiller ``detection/model/rcnn.py``, ``KD.TYPE: DKD``): the same TCKD / NCKD terms between the
student's and the teacher's ROI class logits of the student's sampled proposals, the proposals' assigned classes
(background included) as targets (:meth:`Distiller.logit_targets`), added to the detector's own losses (scaled by
``ce_weight``). There ``rcnn_dkd_loss`` calls ``dkd_loss`` without any warm-up factor, with ``detection/model/
config.py``'s ``KD.DKD.ALPHA 1.0``, ``BETA 0.25``, ``T 1.0`` (no pair config overrides them): a detection recipe sets
``alpha: 1, beta: 0.25, temperature: 1, warmup_epochs: 0`` (0 = no ramp), not these CIFAR defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import cross_entropy, logsumexp_excluding, warmup_factor
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import CLASSIFICATION, DETECTION, Batch, Progress


@dataclass
class DKDConfig:
    alpha: float = 1.0  # mdistiller configs/cifar100/dkd/*.yaml DKD.ALPHA (TCKD weight)
    beta: float = 8.0  # mdistiller res32x4_res8x4.yaml DKD.BETA; per-pair values live in the recipes
    temperature: float = 4.0  # mdistiller DKD.T
    warmup_epochs: int = 20  # mdistiller DKD.WARMUP (ImageNet: 1)
    ce_weight: float = 1.0  # mdistiller DKD.CE_WEIGHT


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """sum_k p_t (log p_t - log p_s) per row; 0*log 0 counts as 0, as F.kl_div's xlogy does."""
    p_teacher = log_p_teacher.exp()
    return torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(dim=1)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Raw (TCKD, NCKD), both with the T^2 factor and the batch mean."""
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    gt_mask = F.one_hot(target, z_s.shape[1]).bool()

    def binary_log_probs(z: Tensor) -> Tensor:
        lse = torch.logsumexp(z, dim=1)
        log_p_target = z.gather(1, target[:, None]).squeeze(1) - lse
        log_p_other = logsumexp_excluding(z, gt_mask) - lse
        return torch.stack([log_p_target, log_p_other], dim=1)

    tckd = _kl_rows(binary_log_probs(z_t), binary_log_probs(z_s)).mean() * temperature**2
    # Non-target distribution: the reference subtracts 1000 from the (tempered) target logit.
    log_q_s = F.log_softmax(z_s - 1000.0 * gt_mask, dim=1)
    log_q_t = F.log_softmax(z_t - 1000.0 * gt_mask, dim=1)
    nckd = _kl_rows(log_q_t, log_q_s).mean() * temperature**2
    return tckd, nckd


@register_method("dkd")
class DKD(Distiller):
    supported_tasks = (CLASSIFICATION, DETECTION)
    Config = DKDConfig

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        target = self.logit_targets(student, batch)
        tckd, nckd = dkd_terms(
            self.distilled_logits(student.logits), self.distilled_logits(teacher.logits), target, cfg.temperature
        )
        ramp = warmup_factor(progress.epoch, cfg.warmup_epochs)
        if self.task.name == DETECTION:  # the detector's own loss terms in place of the cross-entropy
            losses = {k: cfg.ce_weight * v for k, v in self.task_loss_terms(student, batch.target).items()}
        else:
            losses = {"loss_ce": cfg.ce_weight * cross_entropy(student.logits, target)}
        losses["loss_tckd"] = ramp * cfg.alpha * tckd
        losses["loss_nckd"] = ramp * cfg.beta * nckd
        return losses

    def distilled_logits(self, logits: Tensor) -> Tensor:
        """The logits the TCKD / NCKD terms compare (the cross-entropy always sees the raw student logits);
        logit standardization's ``dkd_ls`` Z-scores them."""
        return logits

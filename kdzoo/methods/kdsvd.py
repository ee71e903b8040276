"""KD-SVD — Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018, arXiv 1807.06819 (methods.md §7).

Reference: RepDistiller ``distiller_zoo/KDSVD.py`` (a port of the authors' TensorFlow code), which is
authoritative. mdistiller's ``KDSVD`` reshapes maps to [B, C*H, W] and computes a different quantity.
Per stage the map becomes X = [B, H*W, C]; the teacher keeps its top-k right-singular vectors, the
student its top k+3, each teacher vector is matched with the student vector of largest |cosine|
(sign-corrected), both are scaled by the teacher's normalised singular values, and RBF correlations
between consecutive stages are regressed.

The SVD runs in fp32 through ``torch.linalg.svd``, the same LAPACK/cuSOLVER call as the reference's
``torch.svd``: singular vectors are defined up to sign and the loss depends on the relative sign of
consecutive stages, so another solver (e.g. ``eigh`` of X^T X) would change the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Batch, Distiller, Progress
from kdzoo.methods.losses import at_least_fp32, autocast_off, ce_and_kd
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs


@dataclass
class KDSVDConfig:
    k: int = 1  # RD KDSVD(k=1) (MD KDSVD.K 1): teacher singular vectors kept; the student keeps k + 3
    feat_weight: float = 1.0  # MD KDSVD.LOSS.FEAT_WEIGHT 1 (RD ships no script line for KD-SVD)
    ce_weight: float = 1.0  # MD KDSVD.LOSS.CE_WEIGHT 1
    kd_weight: float = 0.0  # RD -a 0 convention for feature methods
    temperature: float = 4.0  # RD --kd_T 4, used only when kd_weight > 0


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def top_singular(feature_map: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Top-n right-singular vectors V [B, C, n] (unit columns) and normalised singular values [B, n]
    of X = [B, H*W, C]. Non-finite entries are zeroed, as the reference does."""
    x = feature_map.flatten(2).transpose(1, 2)  # RD views [B, C, H*H] (square maps), then transposes
    _, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    v = F.normalize(_finite_or_zero(vh[:, :n, :].transpose(1, 2)), dim=1)
    sigma = F.normalize(_finite_or_zero(sigma[:, :n]), dim=1)
    return v, sigma


def align_to_teacher(v_student: Tensor, v_teacher: Tensor) -> Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, times the cosine's sign
    (ties add up, as in the reference's mask product)."""
    cosine = v_student.transpose(1, 2) @ v_teacher  # [B, k+3, k]
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_student @ mask


def _rbf(current: Tensor, previous: Tensor) -> Tensor:
    """exp(-(v_i - v_j)^2 / 8) between every channel of two consecutive stages: [B, C_i, C_{i-1}, k]."""
    return torch.exp(-(current.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8)


def kdsvd_pair_losses(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], k: int) -> list[Tensor]:
    """One term per pair of consecutive stages, summed over B, channels and k, divided by B."""
    losses: list[Tensor] = []
    previous: tuple[Tensor, Tensor] | None = None
    batch_size = student_feats[0].shape[0]
    with autocast_off(student_feats[0]):
        for f_s, f_t in zip(student_feats, teacher_feats, strict=False):
            with torch.no_grad():
                v_t, sigma_t = top_singular(at_least_fp32(f_t), k)
            v_s, _ = top_singular(at_least_fp32(f_s), k + 3)
            v_s = align_to_teacher(v_s, v_t)
            v_t, v_s = v_t * sigma_t.unsqueeze(1), v_s * sigma_t.unsqueeze(1)
            if previous is not None:
                v_s_prev, v_t_prev = previous
                diff = (_rbf(v_s, v_s_prev) - _rbf(v_t, v_t_prev)).pow(2)
                losses.append(_finite_or_zero(diff).sum() / batch_size)
            previous = (v_s, v_t)
    return losses


@register_method("kdsvd")
class KDSVD(Distiller):
    Config = KDSVDConfig
    teacher_taps = ("feats",)
    student_taps = ("feats",)

    def build(self) -> None:
        student_maps, teacher_maps = self.probe_student().feats[1:], self.probe_teacher().feats[1:]
        for i, (f_s, f_t) in enumerate(zip(student_maps, teacher_maps, strict=False), start=1):
            if f_s.shape[1] != f_t.shape[1]:
                raise UserInputError(
                    f"kdsvd matches singular vectors channel by channel, so stage {i} needs equal widths "
                    f"(student {f_s.shape[1]}, teacher {f_t.shape[1]}); RepDistiller fails the same way"
                )
            if f_s.shape[2] != f_s.shape[3] or f_t.shape[2] != f_t.shape[3]:
                raise UserInputError(f"kdsvd assumes square maps (RepDistiller flattens H*H); stage {i} is not")

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        assert teacher is not None
        cfg = self.cfg
        losses = ce_and_kd(student.logits, teacher.logits, batch.target, cfg.ce_weight, cfg.kd_weight, cfg.temperature)
        # RD feat[1:-1]: every stage map after the stem.
        losses["loss_kdsvd"] = cfg.feat_weight * sum(kdsvd_pair_losses(student.feats[1:], teacher.feats[1:], cfg.k))
        return losses

"""KD-SVD — Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018, arXiv 1807.06819 (docs/methods/kdsvd.md).

Reference: RepDistiller ``distiller_zoo/KDSVD.py`` (a port of the authors' TensorFlow code), which is
authoritative. mdistiller's ``KDSVD`` reshapes maps to [B, C*H, W] and computes a different quantity.
Per stage the map becomes X = [B, H*W, C]; the teacher keeps its top-k right-singular vectors, the
student its top k+3, each teacher vector is matched with the student vector of largest |cosine|
(sign-corrected), both are scaled by the teacher's normalised singular values, and RBF correlations
between consecutive stages are regressed.

The teacher's SVD runs in fp32 through ``torch.linalg.svd``, the same LAPACK/cuSOLVER call as the reference's
``torch.svd``: singular vectors are defined up to sign and the loss depends on the relative sign of the
teacher's consecutive stages, so another solver (e.g. ``eigh`` of X^T X) would change the values. The
student's signs do not reach the loss (every student vector is multiplied by the sign of its cosine with the
teacher's), so its top k+3 vectors come from ``eigh`` of the smaller Gram matrix, several times cheaper than
the SVD of X (see ``top_right_vectors``).

On CPU both decompositions run one batch chunk per intra-op thread, each chunk single-threaded
(``split_over_threads``): LAPACK decomposes a batch one matrix at a time, and at these sizes a second thread
inside one decomposition gains nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import at_least_fp32, autocast_off, ce_and_kd
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress


@dataclass
class KDSVDConfig:
    k: int = 1  # RepDistiller KDSVD(k=1) (mdistiller KDSVD.K 1): teacher singular vectors kept; the student keeps k + 3
    feat_weight: float = 1.0  # mdistiller KDSVD.LOSS.FEAT_WEIGHT 1 (RepDistiller ships no script line for KD-SVD)
    ce_weight: float = 1.0  # mdistiller KDSVD.LOSS.CE_WEIGHT 1
    kd_weight: float = 0.0  # RepDistiller -a 0 convention for feature methods
    temperature: float = 4.0  # RepDistiller --kd_T 4, used only when kd_weight > 0


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def split_over_threads(decompose: Callable[[Tensor], tuple[Tensor, ...]], batch: Tensor) -> tuple[Tensor, ...]:
    """``decompose(batch)`` on CPU as ``torch.get_num_threads()`` contiguous chunks of the batch, decomposed
    concurrently, each with one intra-op thread, the outputs concatenated along dim 0; elsewhere (CUDA, one
    thread) the plain call.

    CPU LAPACK (``torch.linalg.svd`` / ``eigh``) loops over a batch one matrix at a time, and at KD-SVD's sizes
    (the bench's [64, 1024, 64], [64, 256, 128], [64, 64, 256] maps) its second thread does not speed one
    matrix up: the teacher's three SVDs took 120 / 163 / 72 ms at two threads, 116 / 142 / 56 ms at one, and
    55 / 96 / 38 ms split in two. Every matrix is decomposed by the same single-threaded call, so the result is
    bit-identical to ``decompose(batch)`` run with one thread; MKL's two-threaded call differs from its own
    one-threaded one by fp32 rounding (~4e-7 on the top singular vectors, same signs)."""
    threads = torch.get_num_threads()
    if batch.device.type != "cpu" or threads < 2 or batch.shape[0] < 2:
        return decompose(batch)

    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: the workers take the caller's

    def single_threaded(chunk: Tensor) -> tuple[Tensor, ...]:
        torch.set_num_threads(1)  # this worker's OpenMP setting (MKL's is process-wide: set below as well)
        with torch.set_grad_enabled(grad_enabled):
            return decompose(chunk)

    torch.set_num_threads(1)
    try:
        chunks = batch.chunk(threads)
        with ThreadPoolExecutor(len(chunks)) as pool:  # short-lived: no idle threads left behind for fork()
            parts = list(pool.map(single_threaded, chunks))
    finally:
        torch.set_num_threads(threads)
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


def top_singular(feature_map: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Top-n right-singular vectors V [B, C, n] (unit columns) and normalised singular values [B, n]
    of X = [B, H*W, C]. Non-finite entries are zeroed, as the reference does."""
    x = feature_map.flatten(2).transpose(1, 2)  # RepDistiller views [B, C, H*H] (square maps), then transposes

    def svd_top(chunk: Tensor) -> tuple[Tensor, Tensor]:
        _, sigma, vh = torch.linalg.svd(chunk, full_matrices=False)
        return sigma[:, :n], vh[:, :n, :]

    sigma, vh = split_over_threads(svd_top, x)
    v = F.normalize(_finite_or_zero(vh.transpose(1, 2)), dim=1)
    sigma = F.normalize(_finite_or_zero(sigma), dim=1)
    return v, sigma


class _TopEigenvectors(torch.autograd.Function):
    """Unit eigenvectors of the ``n`` largest eigenvalues of symmetric matrices A [B, m, m], largest first:
    [B, m, n]. ``torch.linalg.eigh`` forward; the backward is the first-order perturbation that torch's eigh
    backward also uses, dq_i = sum_{j != i} q_j q_j^T dA q_i / (l_i - l_j), but only for the n columns that
    have a gradient. torch's own backward divides by l_j - l_k for every pair, which is 0/0 = NaN for the
    exactly repeated zero eigenvalues of a rank-deficient Gram matrix (dead channels), pairs that carry no
    gradient. An exactly zero gap (j == i, or a degenerate top eigenvalue, where the vectors are not even
    defined) contributes nothing."""

    @staticmethod
    def forward(ctx, matrix: Tensor, n: int) -> Tensor:  # type: ignore[override]
        eigenvalues, eigenvectors = split_over_threads(torch.linalg.eigh, matrix)  # ascending
        ctx.save_for_backward(eigenvalues, eigenvectors)
        ctx.n = n
        return eigenvectors[..., -n:].flip(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        eigenvalues, eigenvectors = ctx.saved_tensors
        top_values, top_vectors = eigenvalues[..., -ctx.n:].flip(-1), eigenvectors[..., -ctx.n:].flip(-1)
        with autocast_off(grad):  # fp32 like the forward, even if backward() is called inside autocast
            gap = top_values.unsqueeze(-2) - eigenvalues.unsqueeze(-1)  # [B, m, n]: l_i - l_j
            coeff = eigenvectors.mT @ grad.to(eigenvectors.dtype)  # q_j . g_i
            coeff = torch.where(gap == 0, torch.zeros_like(coeff), coeff / gap)
            return eigenvectors @ coeff @ top_vectors.mT, None


def top_right_vectors(feature_map: Tensor, n: int) -> Tensor:
    """Top-n right-singular vectors V [B, C, n] of X = [B, H*W, C] as ``top_singular`` returns them, up to the
    sign of each column, from the eigenvectors of the smaller Gram matrix: those of X^T X [C, C] are V; those
    of X X^T [HW, HW] are U, and V = normalise(X^T U). Same values to fp32 rounding (the top vectors' accuracy
    is set by their gap to the next, not by squaring the small singular values), at a fraction of the SVD's
    cost, which also forms U. For the student, whose signs the alignment to the teacher absorbs."""
    x = feature_map.flatten(2).transpose(1, 2)
    hw, channels = x.shape[-2:]
    # X^T U = V diag(sigma): the normalisation below takes it to V.
    v = _TopEigenvectors.apply(x.mT @ x, n) if hw >= channels else x.mT @ _TopEigenvectors.apply(x @ x.mT, n)
    return F.normalize(_finite_or_zero(v), dim=1)


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
            v_s = top_right_vectors(at_least_fp32(f_s), k + 3)  # signs are irrelevant: aligned next
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
        # RepDistiller feat[1:-1]: every stage map after the stem.
        losses["loss_kdsvd"] = cfg.feat_weight * sum(kdsvd_pair_losses(student.feats[1:], teacher.feats[1:], cfg.k))
        return losses

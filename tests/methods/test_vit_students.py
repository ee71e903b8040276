"""The logit methods with a timm vision-transformer student and a CNN teacher: one training step of KD, DKD and
DIST gives finite losses equal to each method's formula, re-stated here in float64, on the logits the two networks
produced; every student parameter gets a gradient."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.models.taps import classifier_of
from kdzoo.types import Batch, Progress

VIT_STUDENT = "timm:vit_tiny_patch16_224"
# 64 patches of 4x4 on 32x32 inputs, 2 blocks of 48 channels.
TINY_VIT_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3}
NUM_CLASSES = 10


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def cross_entropy(z: torch.Tensor, target: torch.Tensor) -> float:
    return float(-log_softmax(z)[torch.arange(len(target)), target].mean())


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_k p log(p / q) per row (p > 0 everywhere here)."""
    return (p * (p.log() - q.log())).sum(dim=1)


def expected_kd(student, teacher, target, temperature=4.0, ce_weight=0.1, kd_weight=0.9) -> dict[str, float]:
    p_s, p_t = log_softmax(student / temperature).exp(), log_softmax(teacher / temperature).exp()
    return {"loss_ce": ce_weight * cross_entropy(student, target),
            "loss_kd": kd_weight * temperature**2 * float(kl_rows(p_t, p_s).mean())}


def expected_dkd(student, teacher, target, epoch, alpha=1.0, beta=8.0, temperature=4.0, warmup=20) -> dict[str, float]:
    """DKD's paper equations: TCKD = KL of the binary (target, rest) distributions, NCKD = KL of the distributions
    over the non-target classes alone, each times T², weighted and ramped over the warm-up epochs."""
    p_s, p_t = log_softmax(student / temperature).exp(), log_softmax(teacher / temperature).exp()
    rows = torch.arange(len(target))
    b_s = torch.stack([p_s[rows, target], 1 - p_s[rows, target]], dim=1)
    b_t = torch.stack([p_t[rows, target], 1 - p_t[rows, target]], dim=1)
    others = torch.ones_like(student, dtype=torch.bool)
    others[rows, target] = False
    non_target_s = log_softmax(student[others].view(len(target), -1) / temperature).exp()
    non_target_t = log_softmax(teacher[others].view(len(target), -1) / temperature).exp()
    ramp = min(epoch / warmup, 1.0)
    return {"loss_ce": cross_entropy(student, target),
            "loss_tckd": ramp * alpha * temperature**2 * float(kl_rows(b_t, b_s).mean()),
            "loss_nckd": ramp * beta * temperature**2 * float(kl_rows(non_target_t, non_target_s).mean())}


def expected_dist(student, teacher, target, beta=2.0, gamma=2.0, temperature=4.0) -> dict[str, float]:
    """DIST: 1 − mean Pearson correlation of the tempered probabilities, per sample (inter) and per class (intra)."""
    p_s, p_t = log_softmax(student / temperature).exp(), log_softmax(teacher / temperature).exp()

    def mean_correlation(a, b):
        a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
        return float(((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean())

    return {"loss_ce": cross_entropy(student, target),
            "loss_dist_inter": beta * temperature**2 * (1 - mean_correlation(p_s, p_t)),
            "loss_dist_intra": gamma * temperature**2 * (1 - mean_correlation(p_s.t(), p_t.t()))}


@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_logit_method_step_with_vit_student_and_cnn_teacher(method):
    torch.manual_seed(0)
    student = kdzoo.create_model(VIT_STUDENT, num_classes=NUM_CLASSES, **TINY_VIT_ARGS)
    teacher = kdzoo.create_model("resnet8", num_classes=NUM_CLASSES)
    with torch.no_grad():  # a confident teacher, as a trained one is (an untrained one is near uniform)
        classifier_of(teacher).weight.mul_(30)
    distiller = kdzoo.create_distiller(method, student=student, teacher=teacher)
    distiller.train()
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, NUM_CLASSES, (6,))
    epoch = 5
    student_logits, losses = distiller.training_step(Batch(images, target), Progress(epoch=epoch))
    assert student_logits.shape == (6, NUM_CLASSES)
    with torch.no_grad():
        teacher_logits = teacher(images).double()
    produced = student_logits.detach().double()
    expected = {"kd": lambda: expected_kd(produced, teacher_logits, target),
                "dkd": lambda: expected_dkd(produced, teacher_logits, target, epoch),
                "dist": lambda: expected_dist(produced, teacher_logits, target)}[method]()
    assert set(losses) == set(expected)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() == pytest.approx(expected[name], rel=1e-5), name
    sum(losses.values()).backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())

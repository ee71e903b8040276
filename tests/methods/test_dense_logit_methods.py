"""CWD and pixel KD against values computed by hand (python floats, explicit loops) and against the reference
formulations (MMRazor's ChannelWiseDivergence, structure_knowledge_distillation's CriterionPixelWise), docs/methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdzoo.methods.cwd import channel_wise_divergence
from kdzoo.methods.pixel_kd import pixel_kd_loss


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


@pytest.fixture
def maps() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64), torch.randn(2, 3, 2, 3, generator=gen,
                                                                                     dtype=torch.float64)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_equals_hand_computed_channel_distributions(maps, tau) -> None:
    student, teacher = maps
    n, c = student.shape[:2]
    total = 0.0
    for i in range(n):
        for k in range(c):
            p_t = _softmax([v / tau for v in teacher[i, k].flatten().tolist()])
            p_s = _softmax([v / tau for v in student[i, k].flatten().tolist()])
            total += _kl(p_t, p_s)
    expected = tau**2 * total / (c * n)
    assert channel_wise_divergence(student, teacher, tau).item() == pytest.approx(expected, rel=1e-12)


def test_cwd_gradient_matches_mmrazor_formulation(maps) -> None:
    """MMRazor writes sum(p_t log p_t - p_t log p_s) * tau^2 / (C N) on [N*C, H*W] rows."""
    student, teacher = maps
    tau = 2.0
    ours = student.clone().requires_grad_(True)
    channel_wise_divergence(ours, teacher, tau).backward()
    ref = student.clone().requires_grad_(True)
    n, c, h, w = ref.shape
    p_t = F.softmax(teacher.reshape(-1, h * w) / tau, dim=1)
    value = torch.sum(p_t * F.log_softmax(teacher.reshape(-1, h * w) / tau, dim=1)
                      - p_t * F.log_softmax(ref.reshape(-1, h * w) / tau, dim=1)) * tau**2 / (c * n)
    value.backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-14)
    assert channel_wise_divergence(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_pixel_kd_equals_hand_computed_pixel_distributions(maps, temperature) -> None:
    student, teacher = maps
    n, _, h, w = student.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p_t = _softmax([v / temperature for v in teacher[i, :, y, x].tolist()])
                p_s = _softmax([v / temperature for v in student[i, :, y, x].tolist()])
                total += _kl(p_t, p_s)
    expected = temperature**2 * total / (h * w)
    assert pixel_kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_pixel_kd_gradient_matches_the_reference_cross_entropy_form(maps) -> None:
    """CriterionPixelWise: sum(-softmax(t) * log_softmax(s)) / W / H over [N*H*W, C] rows; it differs from the KL
    by the teacher entropy only, so the gradients agree exactly."""
    student, teacher = maps
    ours = student.clone().requires_grad_(True)
    pixel_kd_loss(ours, teacher, 1.0).backward()
    ref = student.clone().requires_grad_(True)
    n, c, h, w = ref.shape
    rows_t = teacher.permute(0, 2, 3, 1).reshape(-1, c)
    rows_s = ref.permute(0, 2, 3, 1).reshape(-1, c)
    (torch.sum(-F.softmax(rows_t, dim=1) * F.log_softmax(rows_s, dim=1)) / w / h).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-14)


def test_dense_losses_refuse_mismatched_maps(maps) -> None:
    student, teacher = maps
    with pytest.raises(ValueError, match="equal maps"):
        channel_wise_divergence(student[:, :2], teacher, 1.0)
    with pytest.raises(ValueError, match="equal maps"):
        pixel_kd_loss(student[..., :2], teacher, 1.0)

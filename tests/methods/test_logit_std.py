"""Logit standardization (kd_ls, dkd_ls; docs/methods/logit_std.md) against the equations worked out with
explicit float64 loops, plus training steps on resnet32x4 -> resnet8x4 and the heterogeneous pairs."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.methods.logit_std import standardize_logits
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress
from tests.methods.one_step import HETEROGENEOUS_PAIRS, STUDENT_LOGITS, TARGETS, TEACHER_LOGITS, train_one_step


def zscore(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))  # unbiased, as Tensor.std
    return [(v - mean) / (1e-7 + std) for v in row]


def softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def expected_kd_ls(tau: float) -> float:
    return tau**2 * sum(kl(softmax(zscore(t), tau), softmax(zscore(s), tau))
                        for s, t in zip(STUDENT_LOGITS, TEACHER_LOGITS, strict=True)) / len(STUDENT_LOGITS)


def expected_dkd_ls(tau: float) -> tuple[float, float]:
    """TCKD on [p_y, 1 - p_y], NCKD on the softmax over the non-target classes, both on Z-scored logits."""
    tckd = nckd = 0.0
    for s, t, y in zip(STUDENT_LOGITS, TEACHER_LOGITS, TARGETS, strict=True):
        p_s, p_t = softmax(zscore(s), tau), softmax(zscore(t), tau)
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others_s = softmax([v for k, v in enumerate(zscore(s)) if k != y], tau)
        others_t = softmax([v for k, v in enumerate(zscore(t)) if k != y], tau)
        nckd += kl(others_t, others_s)
    n = len(TARGETS)
    return tau**2 * tckd / n, tau**2 * nckd / n


def expected_ce() -> float:
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y]
               for row, y in zip(STUDENT_LOGITS, TARGETS, strict=True)) / len(TARGETS)


def losses_of(method: str, student_logits: torch.Tensor, epoch: int = 240, **hparams) -> dict[str, torch.Tensor]:
    distiller = kdzoo.create_distiller(method, teacher=kdzoo.create_model("resnet8"),
                                       student=kdzoo.create_model("resnet8"), **hparams)
    batch = Batch(torch.zeros(3), torch.tensor(TARGETS))
    teacher = Outputs(torch.tensor(TEACHER_LOGITS, dtype=torch.float64))
    return distiller.compute_losses(Outputs(student_logits), teacher, batch, Progress(epoch=epoch))


def test_standardize_is_a_per_sample_zscore():
    z = standardize_logits(torch.tensor(STUDENT_LOGITS, dtype=torch.float64))
    for row, expected in zip(z.tolist(), map(zscore, STUDENT_LOGITS), strict=True):
        assert row == pytest.approx(expected, rel=1e-12)


def test_kd_ls_matches_hand_computed():
    losses = losses_of("kd_ls", torch.tensor(STUDENT_LOGITS, dtype=torch.float64))
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert losses["loss_kd"].item() == pytest.approx(9.0 * expected_kd_ls(2.0), rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce(), rel=1e-6)


def test_kd_ls_ignores_the_scale_and_shift_of_the_logits():
    """The point of the pre-process: the student need not match the teacher's logit range."""
    z = torch.tensor(STUDENT_LOGITS, dtype=torch.float64)
    base = losses_of("kd_ls", z)["loss_kd"]
    rescaled = losses_of("kd_ls", 3.0 * z + 5.0)["loss_kd"]
    assert rescaled.item() == pytest.approx(base.item(), rel=1e-5)


@pytest.mark.parametrize(("epoch", "ramp"), [(1, 1 / 20), (20, 1.0), (240, 1.0)])
def test_dkd_ls_matches_hand_computed(epoch, ramp):
    losses = losses_of("dkd_ls", torch.tensor(STUDENT_LOGITS, dtype=torch.float64), epoch=epoch)
    assert set(losses) == {"loss_ce", "loss_tckd", "loss_nckd"}
    tckd, nckd = expected_dkd_ls(2.0)
    assert losses["loss_tckd"].item() == pytest.approx(ramp * 9.0 * tckd, rel=1e-4)
    assert losses["loss_nckd"].item() == pytest.approx(ramp * 72.0 * nckd, rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce(), rel=1e-6)


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    kd = kdzoo.create_distiller("kd_ls", teacher=teacher, student=student)
    assert (kd.cfg.temperature, kd.cfg.ce_weight, kd.cfg.kd_weight) == (2.0, 1.0, 9.0)
    dkd = kdzoo.create_distiller("dkd_ls", teacher=teacher, student=student)
    cfg = dkd.cfg
    assert (cfg.alpha, cfg.beta, cfg.temperature, cfg.warmup_epochs, cfg.ce_weight) == (9.0, 72.0, 2.0, 20, 1.0)


@pytest.mark.parametrize("method", ["kd_ls", "dkd_ls"])
def test_training_step_resnet32x4_resnet8x4(method):
    _, losses = train_one_step(method, epoch=30)
    assert all(v > 0 for v in losses.values())


@pytest.mark.parametrize("pair", HETEROGENEOUS_PAIRS)
def test_heterogeneous_pairs_train(pair):
    train_one_step("dkd_ls", *pair)

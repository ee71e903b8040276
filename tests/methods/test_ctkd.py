"""CTKD (docs/methods/ctkd.md): the cosine ramp of the gradient-reversal scale, the learned temperature, the KD loss at
that temperature and the reversed temperature gradient, all against values worked out independently (explicit
float64 loops, a central finite difference for d loss / d tau); plus training steps."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.methods.ctkd import cosine_grl_scale
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress
from tests.methods.one_step import HETEROGENEOUS_PAIRS, STUDENT_LOGITS, TARGETS, TEACHER_LOGITS, train_one_step

# Logits of a trained network's scale: at tau ~ 15.6 the small example logits would give near-uniform
# distributions whose KL (and its tau-derivative) fp32 resolves only to ~1e-3.
SCALE = 10.0
STUDENT = [[SCALE * v for v in row] for row in STUDENT_LOGITS]
TEACHER = [[SCALE * v for v in row] for row in TEACHER_LOGITS]


def kd_at(tau: float) -> float:
    """tau^2 * mean_b KL(softmax(z_t/tau) || softmax(z_s/tau)) with explicit loops."""
    total = 0.0
    for s, t in zip(STUDENT, TEACHER, strict=True):
        e_s, e_t = [math.exp(v / tau) for v in s], [math.exp(v / tau) for v in t]
        p_s, p_t = [v / sum(e_s) for v in e_s], [v / sum(e_t) for v in e_t]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
    return tau**2 * total / len(STUDENT_LOGITS)


@pytest.mark.parametrize(("epoch", "expected"), [
    (0, 0.0),  # before training: no reversal
    (1, (math.cos(math.pi / 10) + 1) / 2 - 1),  # -0.0244717...
    (5, -0.5),
    (10, -1.0),
    (11, -1.0),
    (240, -1.0),
])
def test_cosine_ramp_of_the_reversal_scale(epoch, expected):
    assert cosine_grl_scale(epoch, 10, 1.0) == pytest.approx(expected, abs=1e-15)
    assert cosine_grl_scale(1, 10, 1.0) == pytest.approx(-0.024471741852423, abs=1e-12)


def make_ctkd():
    return kdzoo.create_distiller("ctkd", teacher=kdzoo.create_model("resnet32x4"),
                                  student=kdzoo.create_model("resnet8x4"))


def test_reference_defaults_and_initial_temperature():
    ctkd = make_ctkd()
    cfg = ctkd.cfg
    assert (cfg.ce_weight, cfg.kd_weight, cfg.temperature_min, cfg.temperature_range) == (0.1, 0.9, 1.0, 20.0)
    assert (cfg.init_logit, cfg.lambda_max, cfg.lambda_ramp_epochs) == (1.0, 1.0, 10)
    # One learnable scalar, trained with the student (same optimiser, weight decay included).
    assert [n for n, _ in ctkd.named_parameters() if n.startswith("temperature_module")] == [
        "temperature_module.global_T"]
    assert ctkd.num_extra_parameters() == 1
    assert any(p is ctkd.temperature_module.global_T for p in ctkd.param_groups(ctkd.stages()[0])[0]["params"])
    tau = ctkd.temperature(Progress(epoch=1))
    assert tau.dim() == 0 and tau.item() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)), rel=1e-6)  # 15.6212


@pytest.mark.parametrize("epoch", [1, 5, 10])
def test_kd_loss_and_reversed_temperature_gradient(epoch):
    ctkd = make_ctkd()
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER)
    losses = ctkd.compute_losses(Outputs(student), Outputs(teacher), Batch(torch.zeros(3), torch.tensor(TARGETS)),
                                 Progress(epoch=epoch))
    assert set(losses) == {"loss_ce", "loss_kd"}
    sig = 1 / (1 + math.exp(-1.0))
    tau = 1 + 20 * sig
    assert losses["loss_kd"].item() == pytest.approx(0.9 * kd_at(tau), rel=1e-5)
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[y]
             for row, y in zip(STUDENT, TARGETS, strict=True)) / 3
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce, rel=1e-5, abs=1e-8)

    sum(losses.values()).backward()
    h = 1e-5
    dkd_dtau = (kd_at(tau + h) - kd_at(tau - h)) / (2 * h)
    lam = (math.cos(min(epoch, 10) * math.pi / 10) + 1) / 2 - 1
    # d tau / d theta = 20 * sigmoid'(1); the GRL multiplies by lambda (<= 0): the temperature ascends the KD loss.
    expected = lam * 0.9 * dkd_dtau * 20 * sig * (1 - sig)
    grad = ctkd.temperature_module.global_T.grad
    assert grad.shape == (1,) and grad.item() == pytest.approx(expected, rel=1e-4)
    assert grad.item() * dkd_dtau <= 0  # opposite to the descent direction of the KD loss
    assert student.grad is not None and torch.isfinite(student.grad).all()  # the student is not reversed


def test_training_step_resnet32x4_resnet8x4():
    distiller, losses = train_one_step("ctkd", epoch=3)
    assert set(losses) == {"loss_ce", "loss_kd"}
    grad = distiller.temperature_module.global_T.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().item() > 0


@pytest.mark.parametrize("pair", HETEROGENEOUS_PAIRS)
def test_heterogeneous_pairs_train(pair):
    train_one_step("ctkd", *pair, epoch=3)

"""Jacobian matching (docs/methods/jacobian.md). Linear teacher and student, whose input gradient d z_c / d x is the
weight row W[c] for every input: the loss and its double-backward gradient on the student weights are
compared with closed forms in float64. Plus training steps (with AT, as the paper combines them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdzoo
from kdzoo.models.taps import Tap, TapSpec
from kdzoo.types import Batch, Progress
from tests.methods.one_step import HETEROGENEOUS_PAIRS, train_one_step

IMAGE_SHAPE = (3, 2, 2)
NUM_CLASSES = 4


class LinearNet(nn.Module):
    """logits = W flatten(x) + b, with a tap spec so the distiller's feature taps work (stem = the image)."""

    def __init__(self, seed: int):
        super().__init__()
        self.stem = nn.Identity()
        self.fc = nn.Linear(12, NUM_CLASSES, dtype=torch.float64)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.fc.weight.copy_(torch.randn(NUM_CLASSES, 12, generator=g, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(NUM_CLASSES, generator=g, dtype=torch.float64))
        self.tap_spec = TapSpec(stem=Tap("stem"), stages=(Tap("stem"),), pooled=Tap("stem", transform="flatten"),
                                classifier="fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(x).flatten(1))


def setup(ce_weight: float = 0.0, **hparams):
    teacher, student = LinearNet(seed=1), LinearNet(seed=2)
    distiller = kdzoo.create_distiller("jacobian", teacher=teacher, student=student, ce_weight=ce_weight, **hparams)
    distiller.train()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, *IMAGE_SHAPE, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 2, 2, 3, 1])
    return distiller, teacher, student, images, targets


def closed_form(w_student: torch.Tensor, w_teacher: torch.Tensor, classes: torch.Tensor, normalize: bool):
    """Loss (1/B) sum_b ||f(W_s[c_b]) - f(W_t[c_b])||^2 and its gradient on W_s, f = w/||w|| or identity."""
    loss, grad = 0.0, torch.zeros_like(w_student)
    batch = len(classes)
    for c in classes.tolist():
        w, v = w_student[c], w_teacher[c]
        if normalize:
            w_hat, u = w / w.norm(), v / v.norm()
            loss += (w_hat - u).pow(2).sum().item() / batch
            # d/dw ||w/|w| - u||^2 = -2 (u - (w_hat.u) w_hat) / |w|
            grad[c] += -2.0 * (u - (w_hat @ u) * w_hat) / w.norm() / batch
        else:
            loss += (w - v).pow(2).sum().item() / batch
            grad[c] += 2.0 * (w - v) / batch
    return loss, grad


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_models_match_closed_form(normalize):
    distiller, teacher, student, images, targets = setup(jacobian_weight=2.5, normalize=normalize)
    _, losses = distiller.training_step(Batch(images, targets), Progress())
    assert set(losses) == {"loss_jacobian"}
    losses["loss_jacobian"].backward()
    loss, grad = closed_form(student.fc.weight.detach(), teacher.fc.weight, targets, normalize)
    assert losses["loss_jacobian"].item() == pytest.approx(2.5 * loss, rel=1e-12)
    torch.testing.assert_close(student.fc.weight.grad, 2.5 * grad, rtol=1e-10, atol=1e-12)
    assert student.fc.bias.grad is None  # the Jacobian of a linear map does not depend on its bias
    assert all(p.grad is None for p in teacher.parameters())
    assert images.grad is None  # the method differentiates a detached copy of the batch


def test_teacher_top1_class_option():
    distiller, teacher, student, images, targets = setup(jacobian_class="teacher_top1")
    top1 = (images.flatten(1) @ teacher.fc.weight.T + teacher.fc.bias).argmax(dim=1)
    assert not torch.equal(top1, targets)  # the two options pick different rows here
    _, losses = distiller.training_step(Batch(images, targets), Progress())
    losses["loss_jacobian"].backward()
    loss, grad = closed_form(student.fc.weight.detach(), teacher.fc.weight, top1, True)
    assert losses["loss_jacobian"].item() == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(student.fc.weight.grad, grad, rtol=1e-10, atol=1e-12)


def test_output_terms_are_added():
    """CE, KD and AT come from the same student forward; AT of identical stem maps is zero here."""
    distiller, teacher, student, images, targets = setup(ce_weight=1.0, kd_weight=0.5, at_weight=1000.0)
    _, losses = distiller.training_step(Batch(images, targets), Progress())
    assert set(losses) == {"loss_ce", "loss_kd", "loss_at", "loss_jacobian"}
    z_s = images.flatten(1) @ student.fc.weight.T + student.fc.bias
    z_t = images.flatten(1) @ teacher.fc.weight.T + teacher.fc.bias
    ce = (torch.logsumexp(z_s, 1) - z_s.gather(1, targets[:, None]).squeeze(1)).mean()
    assert losses["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    p_t = torch.softmax(z_t / 4, 1)
    kd = (p_t * (torch.log_softmax(z_t / 4, 1) - torch.log_softmax(z_s / 4, 1))).sum(1).mean() * 16
    assert losses["loss_kd"].item() == pytest.approx(0.5 * kd.item(), rel=1e-5)
    assert losses["loss_at"].item() == pytest.approx(0.0, abs=1e-12)


def test_reference_defaults_and_bad_class_option():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    cfg = kdzoo.create_distiller("jacobian", teacher=teacher, student=student).cfg
    assert (cfg.jacobian_weight, cfg.normalize, cfg.jacobian_class) == (1.0, True, "target")
    assert (cfg.at_weight, cfg.ce_weight, cfg.kd_weight) == (0.0, 1.0, 0.0)
    with pytest.raises(kdzoo.errors.UserInputError, match="jacobian_class"):
        kdzoo.create_distiller("jacobian", teacher=teacher, student=student, jacobian_class="argmax")


def test_training_step_resnet32x4_resnet8x4_with_at():
    _, losses = train_one_step("jacobian", at_weight=1000.0)
    assert set(losses) == {"loss_ce", "loss_at", "loss_jacobian"}
    # Normalised Jacobians: the distance lies in [0, 4].
    assert 0 < losses["loss_jacobian"].item() <= 4


@pytest.mark.parametrize("pair", HETEROGENEOUS_PAIRS)
def test_heterogeneous_pairs_train(pair):
    train_one_step("jacobian", *pair, batch_size=2, at_weight=1000.0)  # batch 2: ~3 passes through the teacher

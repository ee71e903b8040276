"""NST: golden parity with RepDistiller's NSTLoss, per stage, and both Gram (bmm) forms against the
reference's broadcast form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.methods.nst import nst_stage_losses
from kdzoo.types import Batch
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "nst.pt", weights_only=True)


def test_nst_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("nst", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_nst"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_nst"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)

    with torch.no_grad():
        batch = Batch(golden_common["images"], golden_common["labels"])
        s_out, t_out = distiller.student_extractor(batch.image), distiller.teacher_forward(batch)
    stages = nst_stage_losses(s_out.feats[1:], t_out.feats[1:])
    for actual, expected in zip(stages, ref["loss_terms"]["loss_kd"], strict=True):
        torch.testing.assert_close(actual.item(), expected, rtol=1e-4, atol=1e-9)


def _broadcast_poly_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The reference's [B, C_b, C_a, HW] broadcast product, written out as an independent oracle.
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2).mean()


# Fewer channels than positions: the [C, C] Gram form; more: the [HW, HW] form.
@pytest.mark.parametrize(("student_shape", "teacher_shape"), [((6, 8, 8), (10, 16, 16)), ((40, 4, 4), (48, 8, 8))])
def test_gram_forms_equal_broadcast_form_with_mismatched_shapes(student_shape, teacher_shape):
    torch.manual_seed(0)
    f_s = torch.randn(3, *student_shape, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, *teacher_shape, dtype=torch.float64)
    (loss,) = nst_stage_losses([f_s], [f_t])
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(F.adaptive_avg_pool2d(f_t, student_shape[1:]).flatten(2), dim=2)
    expected = _broadcast_poly_mean(t, t) + _broadcast_poly_mean(s, s) - 2 * _broadcast_poly_mean(s, t)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, f_s)
    (expected_grad,) = torch.autograd.grad(expected, f_s)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("nst", teacher=teacher, student=student)
    assert (distiller.cfg.feat_weight, distiller.cfg.ce_weight, distiller.cfg.kd_weight) == (50.0, 1.0, 0.0)

"""SP: golden parity with RepDistiller's Similarity on the last stage map."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.methods.sp import sp_loss
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "sp.pt", weights_only=True)


def test_sp_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("sp", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_sp"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_sp"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(losses["loss_sp"], weights["loss_kd"] * ref["loss_terms"]["loss_kd"][0])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)


def test_sp_is_shape_agnostic_and_scale_invariant():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 9, 5, 5, dtype=torch.float64)
    loss = sp_loss(f_s, f_t)
    g_s, g_t = f_s.flatten(1) @ f_s.flatten(1).T, f_t.flatten(1) @ f_t.flatten(1).T
    expected = ((g_t / g_t.norm(dim=1, keepdim=True) - g_s / g_s.norm(dim=1, keepdim=True)) ** 2).sum() / 16
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sp_loss(3.0 * f_s, f_t), loss)


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("sp", teacher=teacher, student=student)
    assert (distiller.cfg.feat_weight, distiller.cfg.ce_weight, distiller.cfg.kd_weight) == (3000.0, 1.0, 0.0)

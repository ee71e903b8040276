"""PKT: golden parity with RepDistiller's PKT on the pooled features."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.methods.pkt import conditional_probabilities, pkt_loss
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "pkt.pt", weights_only=True)


def test_pkt_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("pkt", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_pkt"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_pkt"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)


def test_pkt_on_stored_train_mode_pooled_features(golden_common, ref):
    # What the reference step fed to PKT: the student in train mode, the teacher in eval mode.
    student = golden_common["student_train_mode"]["pooled"]
    teacher = golden_common["teacher_eval"]["pooled"]
    torch.testing.assert_close(pkt_loss(student, teacher).item(), ref["losses"]["loss_kd"], rtol=1e-4, atol=0.0)


def test_probabilities_are_row_stochastic_and_nan_safe():
    x = torch.randn(5, 7, dtype=torch.float64)
    x[2] = float("nan")
    probs = conditional_probabilities(x)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert pkt_loss(x, x).abs().item() < 1e-12


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("pkt", teacher=teacher, student=student)
    assert (distiller.cfg.feat_weight, distiller.cfg.ce_weight, distiller.cfg.kd_weight) == (30000.0, 1.0, 0.0)

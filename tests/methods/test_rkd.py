"""RKD: golden parity with RepDistiller's RKDLoss(w_d=25, w_a=50), distance and angle separately."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.methods.rkd import angles, normalized_distances, rkd_terms
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "rkd.pt", weights_only=True)


def test_rkd_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("rkd", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_rkd_distance", "loss_rkd_angle"}
    raw, weights, parts = ref["losses"], ref["loss_weights"], ref["loss_terms"]["loss_kd_parts"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_rkd_distance"], weights["loss_kd"] * 25.0 * parts["distance"])
    assert_loss(losses["loss_rkd_angle"], weights["loss_kd"] * 50.0 * parts["angle"])
    assert_loss(losses["loss_rkd_distance"] + losses["loss_rkd_angle"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)


def test_rkd_on_stored_train_mode_pooled_features(golden_common, ref):
    distance, angle = rkd_terms(golden_common["student_train_mode"]["pooled"],
                                golden_common["teacher_eval"]["pooled"])
    parts = ref["loss_terms"]["loss_kd_parts"]
    torch.testing.assert_close(distance.item(), parts["distance"], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(angle.item(), parts["angle"], rtol=1e-5, atol=0.0)


def test_distance_and_angle_definitions():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    d = normalized_distances(x, 1e-12)
    raw = torch.tensor([[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(d, raw / 4.0)  # mean of the six off-diagonal distances is 4
    a = angles(x).view(3, 3, 3)
    assert a[0, 1, 2].abs() < 1e-12  # right angle at x_0
    torch.testing.assert_close(a[1, 0, 2], torch.tensor(3 / 5, dtype=torch.float64))
    assert a[0, 0].abs().max() == 0  # e_ii = normalize(0) = 0


def test_zero_weight_skips_the_term():
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("rkd", teacher=teacher, student=student, angle_weight=0.0)
    _, losses = distiller.forward_train(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    assert set(losses) == {"loss_ce", "loss_rkd_distance"}


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("rkd", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.distance_weight, cfg.angle_weight, cfg.feat_weight, cfg.ce_weight, cfg.kd_weight) == (
        25.0, 50.0, 1.0, 1.0, 0.0)

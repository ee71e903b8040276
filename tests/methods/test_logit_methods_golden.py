"""Golden parity of the logit methods (KD, DKD) against RepDistiller / mdistiller fixtures."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def kd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "kd.pt", weights_only=True)


@pytest.fixture(scope="module")
def dkd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "dkd.pt", weights_only=True)


def test_kd_matches_repdistiller(golden_common, kd_ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("kd", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_kd"}
    raw, weights = kd_ref["losses"], kd_ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_kd"], weights["loss_div"] * raw["loss_div"])
    assert_loss(total, kd_ref["total"])
    assert_student_grads(student, kd_ref)


@pytest.mark.parametrize("epoch", ["1", "10", "20", "21"])
def test_dkd_matches_mdistiller_with_warmup(golden_common, dkd_ref, epoch):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("dkd", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common, epoch=int(epoch))
    ref = dkd_ref["by_epoch"][epoch]
    for name in ("loss_ce", "loss_tckd", "loss_nckd"):
        assert_loss(losses[name], ref["loss_weights"][name] * ref["losses"][name])
    assert_loss(total, ref["total"])
    if epoch == "20":
        assert_student_grads(student, dkd_ref)


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    kd = kdzoo.create_distiller("kd", teacher=teacher, student=student)
    assert (kd.cfg.temperature, kd.cfg.ce_weight, kd.cfg.kd_weight) == (4.0, 0.1, 0.9)
    dkd = kdzoo.create_distiller("dkd", teacher=teacher, student=student, beta=6.0)
    assert (dkd.cfg.alpha, dkd.cfg.beta, dkd.cfg.temperature, dkd.cfg.warmup_epochs) == (1.0, 6.0, 4.0, 20)
    assert kd.num_extra_parameters() == 0

"""SRRL: golden parity with DefangChen/SimKD (methods/srrl.pt), defaults and heterogeneous pairs."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.models.taps import Tap, TapSpec, get_tap_spec
from kdzoo.types import Batch, Progress
from tests.methods.golden_step import (
    assert_extra_grads,
    assert_loss,
    assert_student_grads,
    build_pair,
    load_extra_by_order,
    run_step,
)


@pytest.fixture(scope="module")
def srrl_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "srrl.pt", weights_only=True)


def test_srrl_matches_reference(golden_common, srrl_ref):
    ref = srrl_ref
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("srrl", teacher=teacher, student=student)
    load_extra_by_order(distiller.connector, ref)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_srrl_feat", "loss_srrl_logit"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_kd"], weights["loss_div"] * raw["loss_div"])
    feat_term, logit_term = ref["loss_terms"]["loss_kd"]
    assert_loss(losses["loss_srrl_feat"], weights["loss_kd"] * feat_term)
    assert_loss(losses["loss_srrl_logit"], weights["loss_kd"] * logit_term)
    assert_loss(losses["loss_srrl_feat"] + losses["loss_srrl_logit"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)
    connector = dict(distiller.connector.named_parameters())
    assert_extra_grads(connector, ref, name_map=lambda n: n.removeprefix("transfer."))
    # The teacher classifier is used but frozen: no gradient, not an extra parameter, not in the method's state.
    assert all(p.grad is None for p in teacher.parameters())
    assert distiller.num_extra_parameters() == 66_048  # golden: 3 tensors, 66,048 values
    assert not any("_teacher_classifier" in k for k in distiller.state_dict())


def test_srrl_defaults_and_deployment():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("srrl", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.srrl_weight, cfg.ce_weight, cfg.kd_weight, cfg.temperature) == (1.0, 1.0, 1.0, 4.0)
    assert distiller.export_student() is student  # the connector is discarded at test time
    assert list(distiller.extra_modules()) == ["connector"]


def test_srrl_requires_a_teacher_classifier():
    teacher = kdzoo.create_model("resnet8")
    spec = get_tap_spec(teacher)
    teacher.tap_spec = TapSpec(stem=spec.stem, stages=spec.stages, pooled=Tap("fc", point="input"), classifier="head")
    with pytest.raises(UserInputError, match="classifier"):
        kdzoo.create_distiller("srrl", teacher=teacher, student=kdzoo.create_model("resnet8"))


HETERO_PAIRS = [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")]


@pytest.mark.parametrize(("teacher_name", "student_name"), HETERO_PAIRS)
def test_srrl_heterogeneous_pairs(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("srrl", teacher=teacher, student=student)
    distiller.train()
    _, losses = distiller.training_step(Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))), Progress())
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_srrl_feat"] > 0 and losses["loss_srrl_logit"] > 0
    total.backward()
    for name, p in [*student.named_parameters(), *distiller.connector.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

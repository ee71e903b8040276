"""SimKD: golden parity with DefangChen/SimKD (methods/simkd.pt), the deployed network, defaults and
heterogeneous pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.simkd import SimKDStudent
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
def simkd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "simkd.pt", weights_only=True)


def _golden_distiller(common, ref):
    teacher, student = build_pair(common)
    distiller = kdzoo.create_distiller("simkd", teacher=teacher, student=student)
    load_extra_by_order(distiller.projector, ref)
    return distiller


def test_simkd_matches_reference(golden_common, simkd_ref):
    ref = simkd_ref
    distiller = _golden_distiller(golden_common, ref)
    losses, total = run_step(distiller, golden_common)
    # SK's weights are -c 0 -d 0 -b 1: CE and KD are computed but weighted 0, so kdzoo leaves them out.
    assert set(losses) == {"loss_simkd"}
    assert_loss(losses["loss_simkd"], ref["loss_weights"]["loss_kd"] * ref["losses"]["loss_kd"])
    assert_loss(total, ref["total"])
    # The student's own fc gets an exactly-zero gradient in SK (weight-0 terms); here it gets none at all.
    student_params = dict(distiller.student.named_parameters())
    for name in ref["fp64"]["zero_grads"]:
        assert student_params[name].grad is None, name
        student_params[name].grad = torch.zeros_like(student_params[name])
    assert_student_grads(distiller.student, ref)
    projector = dict(distiller.projector.named_parameters())
    assert_extra_grads(projector, ref, name_map=lambda n: n.removeprefix("transfer."))
    # The frozen teacher (classifier included) is never optimised.
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_simkd_logits_come_from_the_teacher_classifier(golden_common, simkd_ref):
    distiller = _golden_distiller(golden_common, simkd_ref)
    images = golden_common["images"][:4]
    distiller.train()
    logits, _ = distiller.training_step(Batch(images, golden_common["labels"][:4]), Progress())
    with torch.no_grad():
        student_map = kdzoo.features(distiller.student, images, ("feats",)).feats[-1]
        expected = distiller.teacher.fc(distiller.projector(student_map).mean(dim=(2, 3)))
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits.detach(), distiller.student(images).detach())

    distiller.eval()
    with torch.no_grad():
        test_logits = distiller(images)
        student_map = kdzoo.features(distiller.student, images, ("feats",)).feats[-1]
        expected = distiller.teacher.fc(distiller.projector(student_map).mean(dim=(2, 3)))
    torch.testing.assert_close(test_logits, expected, rtol=1e-5, atol=1e-5)


def test_simkd_exported_student(golden_common, simkd_ref):
    distiller = _golden_distiller(golden_common, simkd_ref)
    deployed = distiller.export_student()
    assert isinstance(deployed, SimKDStudent)
    assert deployed is distiller.export_student()  # built once, hooks registered once
    assert deployed.classifier is distiller.teacher.fc
    keys = set(deployed.state_dict())
    assert {k.split(".")[0] for k in keys} == {"student", "projector", "classifier"}
    assert "classifier.weight" in keys and "projector.0.weight" in keys
    # The distiller's own state_dict holds no duplicate copy of the deployed network.
    assert not any(k.startswith("_deployed") for k in distiller.state_dict())
    deployed.train()
    assert deployed.student.training and deployed.projector.training and not deployed.classifier.training
    images = golden_common["images"][:4]
    deployed.eval()
    with torch.no_grad():
        standalone = SimKDStudent(distiller.student, distiller.projector, distiller.teacher.fc, (1.0, 1.0))
        torch.testing.assert_close(standalone(images), deployed(images))
        torch.testing.assert_close(distiller.forward_test(images), deployed(images))
    # Extra parameters = the projector only (golden: 9 tensors, 214,016 values); the teacher fc stays frozen.
    assert distiller.num_extra_parameters() == 214_016
    assert not any(p.requires_grad for p in deployed.classifier.parameters())


def test_simkd_defaults_and_factors():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("simkd", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.factor, cfg.simkd_weight, cfg.ce_weight, cfg.kd_weight, cfg.temperature) == (2, 1.0, 0.0, 0.0, 4.0)
    for factor, mid in ((4, 64), (8, 32)):
        d = kdzoo.create_distiller("simkd", teacher=teacher, student=student, factor=factor)
        assert d.projector[0].out_channels == mid and d.projector[6].out_channels == 256
        expected = 256 * mid + 2 * mid + mid * mid * 9 + 2 * mid + mid * 256 + 2 * 256
        assert d.num_extra_parameters() == expected


def test_simkd_with_kd_terms_enabled(golden_common, simkd_ref):
    distiller = _golden_distiller(golden_common, simkd_ref)
    distiller.cfg.ce_weight, distiller.cfg.kd_weight = 1.0, 1.0
    losses, _ = run_step(distiller, golden_common)
    # SK computes CE/KD on the student's own logits before replacing them.
    assert_loss(losses["loss_ce"], simkd_ref["losses"]["loss_cls"])
    assert_loss(losses["loss_kd"], simkd_ref["losses"]["loss_div"])


def test_simkd_requires_a_teacher_classifier():
    teacher = kdzoo.create_model("resnet8")
    spec = get_tap_spec(teacher)
    teacher.tap_spec = TapSpec(stem=spec.stem, stages=spec.stages, pooled=Tap("fc", point="input"), classifier="head")
    with pytest.raises(UserInputError, match="classifier"):
        kdzoo.create_distiller("simkd", teacher=teacher, student=kdzoo.create_model("resnet8"))
    with pytest.raises(UserInputError):
        kdzoo.create_distiller("simkd", student=kdzoo.create_model("resnet8"))


HETERO_PAIRS = [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")]


@pytest.mark.parametrize(("teacher_name", "student_name"), HETERO_PAIRS)
def test_simkd_heterogeneous_pairs(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("simkd", teacher=teacher, student=student)
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    logits, losses = distiller.training_step(Batch(images, labels), Progress())
    total = sum(losses.values())
    assert logits.shape == (4, 100) and torch.isfinite(total)
    total.backward()
    # Only the backbone up to the last stage map is used (the student's own head: classifier, and for WRN /
    # ShuffleNet the final BN / conv, gets no gradient, as in SK).
    params = dict(student.named_parameters())
    last_map = kdzoo.features(student, images, ("feats",)).feats[-1]
    upstream = torch.autograd.grad(last_map.sum(), list(params.values()), allow_unused=True)
    assert any(g is None for g in upstream)
    for (name, p), reaches in zip(params.items(), upstream, strict=True):
        if reaches is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in distiller.projector.parameters())
    distiller.eval()
    with torch.no_grad():
        assert distiller(images).shape == (4, 100)


def test_simkd_projector_init_is_pytorch_default():
    torch.manual_seed(0)
    projector = kdzoo.create_distiller(
        "simkd", teacher=kdzoo.create_model("resnet32x4"), student=kdzoo.create_model("resnet8x4")).projector
    conv = projector[3]
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    bound = 1 / (conv.in_channels * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound

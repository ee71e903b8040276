"""AB (activation boundaries) against RepDistiller's fixture: init stage (AB loss on the feature extractor) and
main stage (cross-entropy only), stage declarations, heterogeneous pairs."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.methods.ab import ab_loss_terms
from tests.methods.golden_step import (
    assert_loss,
    assert_student_grads,
    build_pair,
    run_step,
    stage_step,
    trainable_names,
)


@pytest.fixture(scope="module")
def ab_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "ab.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_distiller(golden_common):
    # Shared: a step without an optimiser changes only train-mode BatchNorm statistics, which no
    # train-mode output depends on.
    teacher, student = build_pair(golden_common)
    return kdzoo.create_distiller("ab", teacher=teacher, student=student)


def test_init_stage_matches_repdistiller(golden_common, ab_ref, golden_distiller):
    distiller, student = golden_distiller, golden_distiller.student
    assert len(list(distiller.connectors.parameters())) == 0  # identities: shapes match, as in the fixture
    ref = ab_ref["init_stage"]
    losses = stage_step(distiller, golden_common["images"], golden_common["labels"], "init")
    assert set(losses) == {"loss_ab"}
    assert_loss(losses["loss_ab"], ref["losses"]["loss_init"])
    assert_loss(losses["loss_ab"], 401.1706848144531)
    assert_student_grads(student, ref)
    assert student.fc.weight.grad is None and student.fc.bias.grad is None

    with torch.no_grad():
        images = golden_common["images"]
        s_out, t_out = distiller.student_extractor(images), distiller.teacher_extractor(images)
    terms = ab_loss_terms(s_out.preact[1:], t_out.preact[1:], margin=1.0)
    for term, expected in zip(terms, ref["loss_terms"]["loss_init"], strict=True):
        assert_loss(term, expected)


def test_main_stage_is_cross_entropy_only(golden_common, ab_ref, golden_distiller, monkeypatch):
    distiller, student = golden_distiller, golden_distiller.student
    monkeypatch.setattr(distiller, "teacher_forward", lambda batch: pytest.fail("the main stage runs no teacher"))
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce"}
    assert ab_ref["losses"]["loss_kd"] == 0.0  # RD's loop: loss_kd = 0 for abound
    assert_loss(losses["loss_ce"], ab_ref["loss_weights"]["loss_cls"] * ab_ref["losses"]["loss_cls"])
    assert_loss(total, ab_ref["total"])
    assert_student_grads(student, ab_ref)


def test_stages_declare_reference_schedule(golden_common, ab_ref, golden_distiller):
    distiller, student = golden_distiller, golden_distiller.student
    init, main = distiller.stages()
    assert (init.name, init.epochs, init.lr, init.use_schedule) == ("init", 30, None, False)  # lr None = base lr
    assert (main.name, main.epochs, main.lr, main.use_schedule) == ("main", None, None, True)
    student_params = {f"student.{n}" for n, _ in student.named_parameters()}
    optimised = {f"student.{n}" for n in ab_ref["init_stage"]["student_params_optimised"]}  # RD: no fc
    assert trainable_names(distiller, init) == optimised
    assert trainable_names(distiller, main) == student_params
    assert not any(k.startswith("student_body") for k in distiller.state_dict())  # the view owns nothing
    small = kdzoo.create_model("resnet8")
    only_main = kdzoo.create_distiller("ab", teacher=small, student=kdzoo.create_model("resnet8"), init_epochs=0)
    assert [s.name for s in only_main.stages()] == ["main"]


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("ab", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.margin, cfg.init_epochs, cfg.init_lr, cfg.ce_weight, cfg.kd_weight) == (1.0, 30, None, 1.0, 0.0)
    assert distiller.num_extra_parameters() == 0


@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")])
def test_heterogeneous_pairs_train_in_both_stages(pair):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(pair[0]), kdzoo.create_model(pair[1])
    distiller = kdzoo.create_distiller("ab", teacher=teacher, student=student)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    init, main = distiller.stages()

    losses = stage_step(distiller, images, labels, "init")
    assert set(losses) == {"loss_ab"} and torch.isfinite(losses["loss_ab"]) and losses["loss_ab"] > 0
    # Every parameter upstream of a tapped stage map must learn; nothing outside the init stage's set may.
    taps = distiller.student_extractor(images).preact[1:]
    body = list(distiller.student_body.parameters())
    reach = torch.autograd.grad(sum(t.sum() for t in taps), body, allow_unused=True)
    expected = {id(p) for p, g in zip(body, reach) if g is not None}
    expected |= {id(p) for p in distiller.connectors.parameters()}
    trainable = {id(p) for p in distiller.trainable_parameters(init)}
    for name, p in distiller.named_parameters():
        if id(p) in expected:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        if p.grad is not None:
            assert id(p) in trainable, name
    if pair[1] == "ShuffleV2":  # student maps are half the teacher's size: transposed-conv connectors
        assert all(isinstance(c.conv, torch.nn.ConvTranspose2d) for c in distiller.connectors)

    losses = stage_step(distiller, images, labels, "main")
    assert set(losses) == {"loss_ce"} and torch.isfinite(losses["loss_ce"])
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in distiller.connectors.parameters())
    assert {id(p) for p in distiller.trainable_parameters(main)} == {id(p) for p in student.parameters()}

"""FSP against RepDistiller's fixture: init stage (FSP-matrix loss on the feature extractor) and main stage
(cross-entropy only), the bmm FSP matrices vs RD's broadcast formula, stage declarations, channel checks."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.fsp import fsp_loss_terms, fsp_matrices
from tests.methods.golden_step import (
    assert_loss,
    assert_student_grads,
    build_pair,
    run_step,
    stage_step,
    trainable_names,
)


@pytest.fixture(scope="module")
def fsp_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "fsp.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_distiller(golden_common):
    # Shared: a step without an optimiser changes only train-mode BatchNorm statistics, which no
    # train-mode output depends on.
    teacher, student = build_pair(golden_common)
    return kdzoo.create_distiller("fsp", teacher=teacher, student=student)


def test_init_stage_matches_repdistiller(golden_common, fsp_ref, golden_distiller):
    distiller, student = golden_distiller, golden_distiller.student
    ref = fsp_ref["init_stage"]
    losses = stage_step(distiller, golden_common["images"], golden_common["labels"], "init")
    assert set(losses) == {"loss_fsp"}
    assert_loss(losses["loss_fsp"], ref["losses"]["loss_init"])
    assert_loss(losses["loss_fsp"], 128.8479766845703)
    assert_student_grads(student, ref)
    assert student.fc.weight.grad is None

    with torch.no_grad():
        images = golden_common["images"]
        s_out, t_out = distiller.student_extractor(images), distiller.teacher_extractor(images)
    for term, expected in zip(fsp_loss_terms(s_out.feats, t_out.feats), ref["loss_terms"]["loss_init"], strict=True):
        assert_loss(term, expected)


def test_fsp_matrices_equal_repdistiller_broadcast_formula():
    torch.manual_seed(0)
    feats = [torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 6, 8, 8, dtype=torch.float64),
             torch.randn(3, 5, 4, 4, dtype=torch.float64)]
    grams = fsp_matrices(feats)
    for (bottom, top), gram in zip([(feats[0], feats[1]), (feats[1], feats[2])], grams, strict=True):
        if bottom.shape[2] > top.shape[2]:
            bottom = torch.nn.functional.adaptive_avg_pool2d(bottom, top.shape[2:])
        broadcast = (bottom.flatten(2).unsqueeze(1) * top.flatten(2).unsqueeze(2)).mean(-1)  # RD compute_fsp
        assert gram.shape == (3, top.shape[1], bottom.shape[1])
        torch.testing.assert_close(gram, broadcast, rtol=1e-12, atol=1e-12)


def test_main_stage_is_cross_entropy_only(golden_common, fsp_ref, golden_distiller, monkeypatch):
    distiller, student = golden_distiller, golden_distiller.student
    monkeypatch.setattr(distiller, "teacher_forward", lambda batch: pytest.fail("the main stage runs no teacher"))
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce"}
    assert fsp_ref["losses"]["loss_kd"] == 0.0  # RD's loop: loss_kd = 0 for fsp (-b 50 inert)
    assert_loss(losses["loss_ce"], fsp_ref["loss_weights"]["loss_cls"] * fsp_ref["losses"]["loss_cls"])
    assert_loss(total, fsp_ref["total"])
    assert_student_grads(student, fsp_ref)


def test_stages_declare_reference_schedule(golden_common, fsp_ref, golden_distiller):
    distiller, student = golden_distiller, golden_distiller.student
    init, main = distiller.stages()
    assert (init.name, init.epochs, init.lr, init.use_schedule) == ("init", 30, None, False)  # lr None = base lr
    assert (main.name, main.epochs, main.lr, main.use_schedule) == ("main", None, None, True)
    optimised = {f"student.{n}" for n in fsp_ref["init_stage"]["student_params_optimised"]}
    assert trainable_names(distiller, init) == optimised
    assert trainable_names(distiller, main) == {f"student.{n}" for n, _ in student.named_parameters()}
    assert distiller.num_extra_parameters() == 0
    pair = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    cfg = kdzoo.create_distiller("fsp", teacher=pair[0], student=pair[1]).cfg
    assert (cfg.init_epochs, cfg.init_lr, cfg.ce_weight, cfg.kd_weight) == (30, None, 1.0, 0.0)


def test_channel_mismatch_is_a_user_error():
    for teacher, student in [("resnet32x4", "ShuffleV2"), ("wrn_40_2", "wrn_40_1"), ("resnet8x4", "resnet8")]:
        with pytest.raises(UserInputError, match="same channel count"):
            kdzoo.create_distiller("fsp", teacher=kdzoo.create_model(teacher), student=kdzoo.create_model(student))


@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")])
def test_heterogeneous_pairs_train_in_both_stages(pair):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(pair[0]), kdzoo.create_model(pair[1])
    distiller = kdzoo.create_distiller("fsp", teacher=teacher, student=student)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    init, main = distiller.stages()

    losses = stage_step(distiller, images, labels, "init")
    assert set(losses) == {"loss_fsp"} and torch.isfinite(losses["loss_fsp"]) and losses["loss_fsp"] > 0
    # Every parameter upstream of a tapped map must learn (not e.g. WRN's final BN); nothing else may.
    body = list(distiller.student_body.parameters())
    taps = distiller.student_extractor(images).feats
    reach = torch.autograd.grad(sum(f.sum() for f in taps), body, allow_unused=True)
    expected = {id(p) for p, g in zip(body, reach) if g is not None}
    assert len(expected) > 0.9 * len(body)
    trainable = {id(p) for p in distiller.trainable_parameters(init)}
    for name, p in student.named_parameters():
        if id(p) in expected:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        if p.grad is not None:
            assert id(p) in trainable, name

    losses = stage_step(distiller, images, labels, "main")
    assert set(losses) == {"loss_ce"} and torch.isfinite(losses["loss_ce"])
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

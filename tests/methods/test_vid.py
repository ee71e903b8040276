"""VID against RepDistiller's golden step (VIDLoss per stage, trained log_scale), defaults, other pairs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.methods.vid import VIDStage
from kdzoo.types import Batch, Progress, Stage
from tests.methods.golden_step import assert_extra_grads, assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def vid_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "vid.pt", weights_only=True)


@pytest.fixture(scope="module")
def vid_step(golden_common, vid_ref):
    teacher, student = build_pair(golden_common)
    torch.manual_seed(0)  # the reference built its extra modules right after this seed
    distiller = kdzoo.create_distiller("vid", teacher=teacher, student=student)
    initial = {name: t.detach().clone() for name, t in distiller.regressors.state_dict().items()}
    # Same attribute names as RepDistiller's ModuleList of VIDLoss: its state_dict loads as is.
    distiller.regressors.load_state_dict(vid_ref["extra_state_dict"])
    losses, total = run_step(distiller, golden_common)
    return SimpleNamespace(distiller=distiller, losses=losses, total=total, initial=initial)


def test_vid_seeded_init_is_the_reference_init(vid_step, vid_ref):
    # Same seed, same construction order and init: the reference's weights exactly (after its fp16 rounding).
    initial = vid_step.initial
    assert set(initial) == set(vid_ref["extra_state_dict"])
    for name, expected in vid_ref["extra_state_dict"].items():
        assert torch.equal(initial[name].to(expected.dtype), expected), name


def test_vid_losses_match_repdistiller(vid_step, vid_ref):
    losses, total = vid_step.losses, vid_step.total
    assert set(losses) == {"loss_ce", "loss_vid"}
    raw, weights = vid_ref["losses"], vid_ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_vid"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, vid_ref["total"])


def test_vid_gradients_match_repdistiller(vid_step, vid_ref):
    distiller = vid_step.distiller
    assert_student_grads(distiller.student, vid_ref)
    # log_scale is trained (RepDistiller), so it must receive its gradient too.
    assert_extra_grads(dict(distiller.regressors.named_parameters()), vid_ref)
    assert set(vid_ref["extra_trainable"]) == {n for n, _ in distiller.regressors.named_parameters()}


def test_vid_stage_terms_match_repdistiller(vid_step, vid_ref, golden_common):
    distiller = vid_step.distiller
    with torch.no_grad():
        teacher_out = distiller.teacher_forward(Batch(golden_common["images"], golden_common["labels"]))
        student_out = distiller.student_extractor(golden_common["images"])
        terms = distiller.stage_losses(student_out.feats, teacher_out.feats)
    assert len(terms) == len(vid_ref["loss_terms"]["loss_kd"]) == 3
    for actual, expected in zip(terms, vid_ref["loss_terms"]["loss_kd"], strict=True):
        assert_loss(actual, expected)


def test_vid_defaults_and_init():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("vid", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.ce_weight, cfg.kd_weight, cfg.feat_weight, cfg.init_pred_var, cfg.eps) == (1.0, 0.0, 1.0, 5.0, 1e-5)
    assert len(distiller.regressors) == 3
    assert distiller.num_extra_parameters() == 258_496  # golden README: 12 parameters, 258,496 values
    for stage, channels in zip(distiller.regressors, (64, 128, 256), strict=True):
        # σ² = softplus(log_scale) + eps = init_pred_var at step 0 (docs/methods/vid.md)
        torch.testing.assert_close(F.softplus(stage.log_scale) + 1e-5, torch.full((channels,), 5.0))
        convs = [m for m in stage.regressor if isinstance(m, torch.nn.Conv2d)]
        assert [tuple(c.weight.shape[:2]) for c in convs] == [(channels, channels)] * 3
        assert all(c.bias is None for c in convs)
    # Every extra parameter, log_scale included, is optimised in the main stage (RD's trainable_list).
    trainable = {id(p) for p in distiller.trainable_parameters(Stage())}
    assert all(id(stage.log_scale) in trainable for stage in distiller.regressors)


def test_vid_pools_the_larger_map():
    torch.manual_seed(0)
    module = VIDStage(4, 6, 6, init_pred_var=5.0, eps=1e-5)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        module.log_scale.copy_(torch.linspace(-1.0, 3.0, 6))  # a non-uniform variance per channel
    var = (F.softplus(module.log_scale) + 1e-5).view(1, -1, 1, 1)
    mean = module.regressor(F.adaptive_avg_pool2d(student, (4, 4)))
    nll = 0.5 * ((mean - teacher) ** 2 / var + var.log())
    torch.testing.assert_close(module(student, teacher), nll.mean())
    # Student smaller than the teacher: the teacher map is pooled instead.
    small = torch.randn(2, 4, 2, 2)
    nll = 0.5 * ((module.regressor(small) - F.adaptive_avg_pool2d(teacher, (2, 2))) ** 2 / var + var.log())
    torch.testing.assert_close(module(small, teacher), nll.mean())


@pytest.mark.parametrize(("teacher_name", "student_name"), [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"),
                                                            ("resnet32x4", "ShuffleV2")])
def test_vid_heterogeneous_pairs_train(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("vid", teacher=teacher, student=student)
    distiller.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    _, losses = distiller.training_step(batch, Progress())
    assert set(losses) == {"loss_ce", "loss_vid"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in [*student.named_parameters(), *distiller.regressors.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

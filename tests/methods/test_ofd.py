"""OFD against mdistiller's golden step (train-mode teacher, margins, partial L2), defaults, other pairs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import kdzoo
from kdzoo.methods.ofd import margin_from_bn, partial_l2
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
def ofd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "ofd.pt", weights_only=True)


@pytest.fixture(scope="module")
def ofd_step(golden_common, ofd_ref):
    teacher, student = build_pair(golden_common)
    torch.manual_seed(0)  # the reference built its extra modules right after this seed
    distiller = kdzoo.create_distiller("ofd", teacher=teacher, student=student)
    margins_before_step = [m.clone() for m in distiller.margins]
    order = [name for name, _ in ofd_ref["extra_param_order"] + ofd_ref["extra_buffer_order"]]
    tensors = [*distiller.connectors.parameters(), *distiller.connectors.buffers()]
    initial = {name: t.detach().clone() for name, t in zip(order, tensors, strict=True)}
    load_extra_by_order(distiller.connectors, ofd_ref)
    losses, total = run_step(distiller, golden_common)
    return SimpleNamespace(distiller=distiller, losses=losses, total=total, initial=initial,
                           margins_before_step=margins_before_step)


def test_ofd_seeded_init_is_the_reference_init(ofd_step, ofd_ref):
    # Same seed, same construction order and init: the reference's weights exactly (after its fp16 rounding).
    initial = ofd_step.initial
    for name, expected in ofd_ref["extra_state_dict"].items():
        assert torch.equal(initial[name].to(expected.dtype), expected), name


def test_ofd_losses_match_mdistiller(ofd_step, ofd_ref):
    losses, total = ofd_step.losses, ofd_step.total
    assert set(losses) == {"loss_ce", "loss_ofd"}
    raw, weights = ofd_ref["losses"], ofd_ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_ce"] * raw["loss_ce"])
    assert_loss(losses["loss_ofd"], weights["loss_ofd"] * raw["loss_ofd"])
    assert_loss(losses["loss_ofd"], ofd_ref["reference_loss_dict"]["loss_kd"])
    assert_loss(total, ofd_ref["total"])


def test_ofd_margins_match_mdistiller(ofd_step, ofd_ref):
    distiller, margins_before_step = ofd_step.distiller, ofd_step.margins_before_step
    assert len(distiller.margins) == len(ofd_ref["margins"]) == 3
    for ours, expected in zip(margins_before_step, ofd_ref["margins"], strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    assert all((m <= 0).all() for m in distiller.margins)
    # Buffers: they follow .to(device) and are saved with the method state.
    assert {"margin0", "margin1", "margin2"} <= set(distiller.method_state_dict())


def test_ofd_gradients_match_mdistiller(ofd_step, ofd_ref):
    distiller = ofd_step.distiller
    assert_student_grads(distiller.student, ofd_ref)
    names = [name for name, _ in ofd_ref["extra_param_order"]]
    assert_extra_grads(dict(zip(names, distiller.connectors.parameters(), strict=True)), ofd_ref)


def test_ofd_teacher_bn_statistics_move_like_mdistiller(ofd_step, ofd_ref):
    distiller = ofd_step.distiller
    assert distiller.teacher.training  # train-mode teacher (batch statistics), no gradients
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    teacher_state = distiller.teacher.state_dict()
    for name, expected in ofd_ref["teacher_bn_after"].items():
        torch.testing.assert_close(teacher_state[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_ofd_stage_terms_match_mdistiller(ofd_step, ofd_ref, golden_common):
    distiller = ofd_step.distiller
    # This extra train-mode forward moves the teacher's running statistics: restore them afterwards.
    teacher_buffers = {name: b.clone() for name, b in distiller.teacher.named_buffers()}
    with torch.no_grad():
        teacher_out = distiller.teacher_forward(Batch(golden_common["images"], golden_common["labels"]))
        student_out = distiller.student_extractor(golden_common["images"])
        terms = distiller.stage_losses(student_out.preact[1:], teacher_out.preact[1:])
        for name, b in distiller.teacher.named_buffers():
            b.copy_(teacher_buffers[name])
    assert ofd_ref["stage_weights"] == [0.25, 0.5, 1.0]
    for actual, expected in zip(terms, ofd_ref["loss_terms"]["loss_ofd"], strict=True):
        assert_loss(actual, expected)


def test_ofd_margin_formula_and_partial_l2():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))  # channel 2: P(x < 0) = Φ(-4) < 1e-3 -> -3|γ|
    expected = [-math.sqrt(2 / math.pi), 1.0 - 2.0 * math.exp(-0.125) / math.sqrt(2 * math.pi) / 0.3085375387, -1.5]
    torch.testing.assert_close(margin_from_bn(bn), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # mdistiller's three-case feat_loss, elementwise.
    torch.manual_seed(0)
    student, teacher, margin = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([-0.5, -0.2, -1.0])
    m = margin.view(1, -1, 1, 1)
    reference = (
        (student - m) ** 2 * ((student > m) & (teacher <= m))
        + (student - teacher) ** 2 * ((student > teacher) & (teacher > m) & (teacher <= 0))
        + (student - teacher) ** 2 * (teacher > 0)
    ).mean(dim=0).sum()
    torch.testing.assert_close(partial_l2(student, teacher, margin), reference)


def test_ofd_defaults_and_connector_init():
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("ofd", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.ce_weight, cfg.kd_weight, cfg.feat_weight, cfg.connector_kernel_size) == (1.0, 0.0, 1e-3, 1)
    assert type(distiller).teacher_train_mode
    assert distiller.num_extra_parameters() == 86_912  # golden README: 9 parameters, 86,912 values
    for connector, channels in zip(distiller.connectors, (64, 128, 256), strict=True):
        conv, bn = connector
        assert conv.weight.shape == (channels, channels, 1, 1) and conv.bias is None
        # N(0, sqrt(2 / (k*k*C_t))) (docs/methods/ofd.md)
        torch.testing.assert_close(conv.weight.std().item(), math.sqrt(2.0 / channels), rtol=0.05, atol=0)
        assert abs(conv.weight.mean().item()) < 0.1 * math.sqrt(2.0 / channels)
        assert torch.equal(bn.weight, torch.ones(channels)) and torch.equal(bn.bias, torch.zeros(channels))
    distiller.eval()
    assert not teacher.training
    distiller.train()
    assert teacher.training and student.training


@pytest.mark.parametrize(("teacher_name", "student_name"), [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"),
                                                            ("resnet32x4", "ShuffleV2")])
def test_ofd_heterogeneous_pairs_train(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("ofd", teacher=teacher, student=student)
    distiller.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    _, losses = distiller.training_step(batch, Progress())
    assert set(losses) == {"loss_ce", "loss_ofd"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in [*student.named_parameters(), *distiller.connectors.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

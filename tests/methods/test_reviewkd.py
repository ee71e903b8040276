"""ReviewKD against mdistiller's fixture (CIFAR config: weight 5, warm-up 20 with 1-based epochs), per-level
HCL terms, ABF initialisation, heterogeneous pairs."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.methods.reviewkd import ABF, hcl_terms
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
def reviewkd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "reviewkd.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_distiller(golden_common, reviewkd_ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("reviewkd", teacher=teacher, student=student)
    # Same module tree as mdistiller (abfs.0 = deepest level): names and registration order agree.
    names = [n for n, _ in distiller.abfs.named_parameters(prefix="abfs")]
    assert names == [n for n, _ in reviewkd_ref["extra_param_order"]]
    load_extra_by_order(distiller.abfs, reviewkd_ref)
    return distiller


def test_losses_follow_warmup_and_per_level_terms(golden_common, reviewkd_ref, golden_distiller):
    distiller = golden_distiller
    distiller.train()
    batch = Batch(golden_common["images"], golden_common["labels"])
    with torch.no_grad():  # one forward; the losses of each epoch differ only by the warm-up factor
        teacher_out, student_out = distiller.teacher_forward(batch), distiller.student_extractor(batch.image)
        for epoch, ref in reviewkd_ref["by_epoch"].items():
            losses = distiller.compute_losses(student_out, teacher_out, batch, Progress(epoch=int(epoch)))
            assert set(losses) == {"loss_ce", "loss_reviewkd"}
            assert_loss(losses["loss_ce"], ref["loss_weights"]["loss_ce"] * ref["losses"]["loss_ce"])
            assert_loss(losses["loss_reviewkd"], ref["loss_weights"]["loss_hcl"] * ref["losses"]["loss_hcl"])
            assert_loss(losses["loss_reviewkd"], ref["reference_loss_dict"]["loss_kd"])
            assert_loss(sum(losses.values()), ref["total"])
        assert reviewkd_ref["by_epoch"]["1"]["warmup_factor"] == 0.05  # 1-based epoch: min(1/20, 1)

        teacher_levels = distiller.teacher_levels(teacher_out)
        student_levels = distiller.student_levels(student_out, len(teacher_levels))
        outputs = distiller.review(student_levels, [t.shape[-2:] for t in teacher_levels])
    assert [tuple(o.shape[1:]) for o in outputs] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)]
    for term, expected in zip(hcl_terms(outputs, teacher_levels), reviewkd_ref["loss_terms"]["loss_hcl"], strict=True):
        assert_loss(term, expected)


def test_gradients_match_mdistiller(golden_common, reviewkd_ref, golden_distiller):
    losses, total = run_step(golden_distiller, golden_common, epoch=20)
    assert_loss(total, reviewkd_ref["total"])
    assert_student_grads(golden_distiller.student, reviewkd_ref)
    assert_extra_grads(dict(golden_distiller.named_parameters()), reviewkd_ref)


def test_reference_defaults_and_init():
    torch.manual_seed(0)
    distiller = kdzoo.create_distiller(
        "reviewkd", teacher=kdzoo.create_model("resnet32x4"), student=kdzoo.create_model("resnet8x4"))
    cfg = distiller.cfg
    assert (cfg.reviewkd_weight, cfg.warmup_epochs, cfg.max_mid_channel, cfg.student_preact, cfg.ce_weight) == (
        5.0, 20, 512, False, 1.0)
    assert distiller.num_extra_parameters() == 1_808_774  # the fixture's count (mid width min(512, 256))
    assert [abf.att_conv is None for abf in distiller.abfs] == [True, False, False, False]
    for abf in distiller.abfs:
        for conv in (abf.conv1[0], abf.conv2[0]):  # kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in))
            fan_in = conv.weight[0].numel()
            bound = math.sqrt(3.0 / fan_in)
            assert conv.weight.abs().max() <= bound
            assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
        torch.testing.assert_close(abf.conv1[1].weight, torch.ones_like(abf.conv1[1].weight))


@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")])
def test_heterogeneous_pairs(pair):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(pair[0]), kdzoo.create_model(pair[1])
    distiller = kdzoo.create_distiller("reviewkd", teacher=teacher, student=student)
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    _, losses = distiller.training_step(Batch(images, labels), Progress(epoch=1))
    assert set(losses) == {"loss_ce", "loss_reviewkd"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in [*student.named_parameters(), *distiller.abfs.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # One ABF per teacher level (stages + pooled), each mapping to the teacher's width.
    with torch.no_grad():
        teacher_levels = distiller.teacher_levels(distiller.teacher_extractor(images))
    assert [abf.conv2[0].out_channels for abf in distiller.abfs][::-1] == [t.shape[1] for t in teacher_levels]
    if pair[1] == "ShuffleV2":  # mid width min(512, 1024): MD's hard-coded cap
        assert distiller.abfs[0].conv1[0].out_channels == 512


def _mdistiller_fusion(abf, x, residual):
    """mdistiller ``ABF.forward``'s fusion as written there: upscale, concatenate, 1x1 conv, sigmoid, blend."""
    residual = torch.nn.functional.interpolate(residual, size=x.shape[-2:], mode="nearest")
    weights = abf.att_conv(torch.cat([x, residual], dim=1))
    return x * weights[:, 0].view(x.shape[0], 1, *x.shape[-2:]) + residual * weights[:, 1].view(
        x.shape[0], 1, *x.shape[-2:])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sizes", [(8, 8, 4, 4), (8, 8, 1, 1), (8, 12, 2, 3), (6, 10, 3, 5), (9, 9, 3, 3),
                                   (4, 4, 4, 4)])
def test_attention_fusion_equals_mdistiller_formula(sizes, channels_last):
    """The broadcast fusion and its hand-written backward against the materialised formula, in float64: factor 2,
    a 1x1 residual (factor 8), factor 4 on a non-square map, factor 2 on odd sizes, factor 3 (not exact:
    materialised first), factor 1; NCHW and NHWC inputs."""
    torch.manual_seed(0)
    height, width, r_height, r_width = sizes
    abf = ABF(3, 5, 4, fuse=True).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, height, width, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    residual = torch.randn(2, 5, r_height, r_width, dtype=torch.float64).contiguous(memory_format=fmt)
    residual.requires_grad_(True)
    upstream = torch.randn(x.shape, dtype=torch.float64)
    inputs = (x, residual, abf.att_conv[0].weight, abf.att_conv[0].bias)

    fused = abf.fuse(x, residual)
    expected = _mdistiller_fusion(abf, x, residual)
    assert fused.shape == expected.shape == x.shape
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((fused * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for name, grad, ref in zip(("x", "residual", "weight", "bias"), grads, expected_grads, strict=True):
        assert grad.shape == ref.shape, name
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12, msg=name)


def test_attention_fusion_fp32_matches_formula():
    """The bench's largest level (factor 2, 32x32) in fp32: same values as the materialised formula to fp32
    rounding, forward and backward."""
    torch.manual_seed(0)
    abf = ABF(8, 16, 8, fuse=True)
    x = torch.randn(3, 16, 32, 32, requires_grad=True)
    residual = torch.randn(3, 16, 16, 16, requires_grad=True)
    upstream = torch.randn(3, 16, 32, 32)
    inputs = (x, residual, abf.att_conv[0].weight, abf.att_conv[0].bias)
    fused = abf.fuse(x, residual)
    expected = _mdistiller_fusion(abf, x, residual)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad((fused * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4)

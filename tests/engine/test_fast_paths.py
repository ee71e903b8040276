"""Optional fast paths give the plain path's losses within the tolerance of their precision:
channels_last (same fp32 math, other memory order), bf16 autocast, and torch.compile."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.engine.runtime import autocast
from kdzoo.models.taps import compile_model
from kdzoo.types import Batch, Progress
from tests.methods.golden_step import build_pair

METHODS = ["kd", "dkd", "fitnet", "at", "crd", "reviewkd", "catkd"]


def _losses(common, method, *, channels_last=False, amp=False, compiled=None):
    teacher, student = build_pair(common)
    torch.manual_seed(0)
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student)
    distiller.bind_dataset(kdzoo.methods.DatasetInfo(100, 100, torch.arange(100) % 100))
    distiller.train()
    images = common["images"]
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compiled:
        for extractor in (distiller.student_extractor, distiller.teacher_extractor):
            extractor.model = compile_model(extractor.model, backend=compiled)
    batch = Batch(images, common["labels"], torch.arange(16), contrast_index=torch.randint(0, 100, (16, 4097)))
    with autocast(torch.device("cpu"), amp, torch.bfloat16):
        _, losses = distiller.training_step(batch, Progress(epoch=30))
    total = sum(losses.values())
    total.backward()
    grad = student.fc.weight.grad.clone()
    return {k: float(v.detach()) for k, v in losses.items()}, grad


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_matches(golden_common, method):
    plain, grad = _losses(golden_common, method)
    fast, fast_grad = _losses(golden_common, method, channels_last=True)
    assert plain.keys() == fast.keys()
    for k in plain:
        assert fast[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-5), k
    assert ((fast_grad - grad).norm() / grad.norm()).item() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_matches_within_bf16_precision(golden_common, method):
    plain, grad = _losses(golden_common, method)
    fast, fast_grad = _losses(golden_common, method, amp=True)
    for k in plain:
        # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through a deep network the
        # activations drift by a few of those steps, the fp32 loss islands add nothing.
        assert fast[k] == pytest.approx(plain[k], rel=5e-2, abs=1e-3), k
    assert ((fast_grad - grad).norm() / grad.norm()).item() < 0.1


@pytest.mark.slow
@pytest.mark.parametrize(("method", "backend"), [("kd", "aot_eager"), ("fitnet", "aot_eager"), ("fitnet", "inductor")])
def test_torch_compile_with_taps_matches(golden_common, method, backend):
    """aot_eager: graph capture with the taps' hooks; inductor: generated kernels (C++ on CPU, needs a
    compiler, as torch.compile's default does everywhere)."""
    plain, grad = _losses(golden_common, method)
    fast, fast_grad = _losses(golden_common, method, compiled=backend)
    for k in plain:
        assert fast[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-5), k
    assert ((fast_grad - grad).norm() / grad.norm()).item() < 1e-4


SEGMENTATION_METHODS = ["vanilla", "ofd", "cwd", "pixel_kd", "fitnet", "at"]


def _segmentation_losses(method, *, channels_last=False, amp=False):
    torch.manual_seed(0)
    teacher = kdzoo.create_model("deeplabv3plus_resnet18", num_classes=4)
    student = kdzoo.create_model("deeplabv3plus_mobilenetv2", num_classes=4)
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student, input_shape=(3, 49, 49),
                                       task=kdzoo.types.TaskSpec("segmentation"))
    # eval mode: DeepLabV3+'s dropout would draw different masks in the two runs' different op orders
    distiller.eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 49, 49, generator=gen)
    target = torch.randint(0, 4, (2, 49, 49), generator=gen)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(torch.device("cpu"), amp, torch.bfloat16):
        _, losses = distiller.training_step(Batch(images, target), Progress(epoch=2))
    sum(losses.values()).backward()
    grad = student.decoder.last_conv[8].weight.grad.clone()
    return {k: float(v.detach()) for k, v in losses.items()}, grad


@pytest.mark.parametrize("method", SEGMENTATION_METHODS)
def test_segmentation_fast_paths_match(method):
    """channels_last (fp32: same numbers) and bf16 autocast (within bf16 precision) on the dense models and
    their per-pixel losses: the fp32 parts of CWD, pixel KD and OFD keep the terms close under bf16."""
    plain, grad = _segmentation_losses(method)
    nhwc, nhwc_grad = _segmentation_losses(method, channels_last=True)
    bf16, bf16_grad = _segmentation_losses(method, amp=True)
    assert plain.keys() == nhwc.keys() == bf16.keys()
    for k in plain:
        assert nhwc[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k
        assert bf16[k] == pytest.approx(plain[k], rel=5e-2, abs=1e-3), k
    assert ((nhwc_grad - grad).norm() / grad.norm()).item() < 1e-4
    assert ((bf16_grad - grad).norm() / grad.norm()).item() < 0.1

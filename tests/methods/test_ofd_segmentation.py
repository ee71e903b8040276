"""OFD on segmentation against an independent re-statement of the official overhaul-distillation
``Segmentation/distiller.py`` and ``train_with_distillation.py`` (loss and gradients), docs/methods/ofd.md.

The re-statement follows the official code line by line: the three-case ``distillation_loss`` summed over the
whole batch, margins from ``scipy.stats.norm`` on the teacher's BatchNorms, ``loss_divider = [8, 4, 2, 1, 1, 16]``,
``loss_seg + loss_distill.sum() / batch_size * 1e-5`` with pytorch-deeplab-xception's cross-entropy (ignore 255,
mean over pixels, divided by the batch). Both sides share the same networks and connector weights; the teacher
runs in train mode on both sides, as in the official trainer."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from kdzoo.methods.ofd import OFD
from kdzoo.models.registry import create_model
from kdzoo.models.taps import bn_before_relu, features
from kdzoo.types import INIT_STAGE, SEGMENTATION, Batch, Progress, TaskSpec

NUM_CLASSES, SIZE = 5, 65
RECIPE = {"feat_weight": 1e-5, "stage_divisors": [8, 4, 2, 1, 1, 16], "connector_init_epochs": 1}
TASK = TaskSpec(SEGMENTATION, ignore_index=255, ce_batch_average=True)


def official_distillation_loss(source, target, margin):
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).sum()


def official_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    margin = []
    for s, m in zip(bn.weight.data, bn.bias.data, strict=True):
        s, m = abs(s.item()), m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.FloatTensor(margin).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = create_model("deeplabv3plus_resnet50", num_classes=NUM_CLASSES)
    student = create_model("deeplabv3plus_resnet18", num_classes=NUM_CLASSES)
    with torch.no_grad():  # non-trivial BN affine parameters, so the margins take both branches
        for bn in bn_before_relu(teacher):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 0.5)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE), generator=gen)
    target[0, :10] = 255
    return teacher, student, images, target


def test_ofd_segmentation_matches_the_official_loss_and_gradients(pair) -> None:
    teacher, student, images, target = pair
    distiller = OFD(student, teacher, RECIPE, input_shape=(3, SIZE, SIZE), task=TASK)
    distiller.train()
    assert teacher.training, "the official trainer keeps the teacher in train mode"
    # DeepLabV3+ has dropout in train mode: both sides draw the same masks (teacher forward, then student).
    torch.manual_seed(7)
    _, losses = distiller(Batch(images, target), Progress(epoch=2, epochs=50))
    total = sum(losses.values())
    params = [*student.parameters(), *distiller.connectors.parameters()]
    ours = torch.autograd.grad(total, params, allow_unused=True)

    # The official computation, on the same networks and connectors.
    torch.manual_seed(7)
    with torch.no_grad():
        t_feats = features(teacher, images, ("preact",)).preact[1:]
    s_out = features(student, images, ("preact",))
    margins = [official_margin(bn) for bn in bn_before_relu(teacher)]
    loss_distill = 0
    loss_divider = [8, 4, 2, 1, 1, 4 * 4]
    for i, (fs, ft) in enumerate(zip(s_out.preact[1:], t_feats, strict=True)):
        source = distiller.connectors[i](fs)
        loss_distill = loss_distill + official_distillation_loss(source, ft.detach(), margins[i]) / loss_divider[i]
    loss_seg = nn.CrossEntropyLoss(ignore_index=255)(s_out.logits, target.long()) / images.shape[0]
    reference = loss_seg + loss_distill / images.shape[0] * 1e-5
    theirs = torch.autograd.grad(reference, params, allow_unused=True)

    assert set(losses) == {"loss_ce", "loss_ofd"}
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_ce"], loss_seg, rtol=1e-6, atol=0)
    for ours_grad, their_grad in zip(ours, theirs, strict=True):
        if their_grad is None:
            assert ours_grad is None
            continue
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-7)


def test_ofd_segmentation_margins_equal_the_official_ones(pair) -> None:
    teacher, student, _, _ = pair
    distiller = OFD(student, teacher, RECIPE, input_shape=(3, SIZE, SIZE), task=TASK)
    for ours, bn in zip(distiller.margins, bn_before_relu(teacher), strict=True):
        torch.testing.assert_close(ours.view(1, -1, 1, 1), official_margin(bn), rtol=1e-6, atol=1e-6)


def test_ofd_segmentation_connector_epoch_trains_only_connectors_at_base_lr(pair) -> None:
    teacher, student, _, _ = pair
    distiller = OFD(student, teacher, RECIPE, input_shape=(3, SIZE, SIZE), task=TASK)
    init, main = distiller.training_stages()
    assert (init.name, init.epochs, init.trainable, init.scale_groups) == (INIT_STAGE, 1, ("connectors",), False)
    trained = {id(p) for p in distiller.trainable_parameters(init)}
    assert trained == {id(p) for p in distiller.connectors.parameters()}
    assert main.scale_groups and main.epochs is None
    with pytest.raises(Exception, match="stage_divisors needs 6"):
        OFD(student, teacher, {**RECIPE, "stage_divisors": [1, 2]}, input_shape=(3, SIZE, SIZE), task=TASK)

"""Helpers shared by the CIFAR architectures."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def check_input_size(model: nn.Module, x: Tensor, size: int | Sequence[int]) -> None:
    """Fail loudly where the reference's fixed pooling would fail obscurely or return garbage.

    ``size`` is the one square resolution the architecture supports, or several of them.
    """
    sizes = (size,) if isinstance(size, int) else tuple(size)
    if x.dim() != 4 or x.shape[-2] != x.shape[-1] or x.shape[-1] not in sizes:
        wanted = " or ".join(f"{s}x{s}" for s in sizes)
        raise ValueError(
            f"{type(model).__name__} expects inputs of shape [B, C, H, W] with H x W = {wanted} (its pooling "
            f"is fixed, as in the reference); got {list(x.shape)}"
        )


def check_4d(model: nn.Module, x: Tensor) -> None:
    """Architectures with adaptive pooling accept any size, but still need an image batch."""
    if x.dim() != 4:
        raise ValueError(f"{type(model).__name__} expects a [B, C, H, W] image batch; got shape {list(x.shape)}")


def init_normal_fan_out(model: nn.Module, *, linear_weight_std: float | None, zero_linear_bias: bool) -> None:
    """The weight init of RepDistiller's VGG, MobileNetV2 and WRN and of the official PyramidNet.

    Over ``model.modules()`` in order, so a seeded run draws the reference's weights: every Conv2d weight
    ~ N(0, 2 / (k_h k_w C_out)) and its bias, where it has one, 0 (no WRN or PyramidNet conv has one: their
    references skip that step); every BatchNorm2d weight 1, bias 0.
    The references differ only on the Linear layers: its weight ~ N(0, ``linear_weight_std``), or PyTorch's
    default draw when None; its bias zeroed when ``zero_linear_bias``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            if linear_weight_std is not None:
                m.weight.data.normal_(0, linear_weight_std)
            if zero_linear_bias:
                m.bias.data.zero_()


def init_kaiming_fan_out(model: nn.Module) -> None:
    """The weight init of RepDistiller's CIFAR ResNets (``models/resnet.py``, ``models/resnetv2.py``), torchvision's
    rule: ``kaiming_normal_`` (fan_out, ReLU gain) for every Conv2d, weight 1 and bias 0 for BatchNorm2d and
    GroupNorm, over ``model.modules()`` in order.

    The same distribution as :func:`init_normal_fan_out`'s convs, but its std, ``sqrt(2) / sqrt(fan_out)``, is
    rounded differently from ``sqrt(2 / fan_out)`` for many fan-outs: kept apart so that seeded weights stay
    bit-identical to each reference's.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)

"""MobileNetV2 of RepDistiller / mdistiller (``models/mobilenetv2.py``) and SimKD's full-width variant.

``MobileNetV2`` is the reference's ``mobile_half`` (width 0.5, expansion 6); ``MobileNetV2_1_0`` is
SimKD's ``mobile_half_double`` (width 1.0). Same module tree, creation order and init as the
reference. Widths are ``int(c * width)`` (truncation, no divisible-by-8 rounding) and the average
pool is fixed for 32x32 inputs, both as in the reference.

Taps: the stages are the linear-bottleneck outputs of blocks 1, 2, 4, 6 (signed: no activation).
The family has no pre-activation taps; ``preact`` repeats ``feats`` (RepDistiller's behaviour).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size, init_normal_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec

# (expansion t, channels c, repeats n, first stride s); t = None means "the model's T".
_SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
_STAGE_BLOCKS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pointwise expansion (kept even when t = 1)
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV2(nn.Module):
    def __init__(self, T: int = 6, num_classes: int = 100, input_size: int = 32, width_mult: float = 0.5):
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"MobileNetV2 input_size must be a multiple of 32, got {input_size}")
        self.input_size = input_size
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTINGS:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, T if t is None else t)
                )
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)  # fixed at construction (reference)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_normal_fan_out(self, linear_weight_std=0.01, zero_linear_bias=True)
        self.tap_spec = TapSpec(
            stem=Tap("conv1"),
            stages=tuple(Tap(f"blocks.{i}") for i in _STAGE_BLOCKS),
            stages_pre=None,
            pooled=Tap("classifier", point="input"),
            classifier="classifier",
            bn_before_relu=tuple(f"blocks.{i}.{len(self.blocks[i]) - 1}.conv.7" for i in _STAGE_BLOCKS),
            signed=True,
            prepool=Tap("avgpool", point="input"),  # after the last 1x1 conv
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, self.input_size)
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(torch.flatten(out, 1))


@register_model("MobileNetV2", family="cifar", aliases=("mobile_half",), description="MobileNetV2 x0.5 (RepDistiller)")
def mobile_half(num_classes: int = 100) -> nn.Module:
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=0.5)


@register_model(
    "MobileNetV2_1_0", family="cifar", aliases=("mobile_half_double",), description="MobileNetV2 x1.0 (SimKD)"
)
def mobile_half_double(num_classes: int = 100) -> nn.Module:
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=1.0)

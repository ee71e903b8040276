"""MobileNetV1 of mdistiller (``mdistiller/models/imagenet/mobilenetv1.py``), its ImageNet student.

``model`` is a Sequential of 14 conv blocks (``conv_bn(3, 32, 2)`` then 13 depthwise-separable
blocks: dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU) and ``AvgPool2d(7)``; head ``fc``. Same keys and
creation order as the reference (PyTorch default init), so mdistiller checkpoints
(``imgnet_dkd_mv1`` etc.) load strictly.

Taps as mdistiller's feature dict: stages = outputs of blocks 3, 5, 11, 13 (post-ReLU), pre =
their last BN outputs (``model.{3,5,11,13}.4``) — the ReLUs after those four BNs are non-in-place
here so the BN outputs survive. mdistiller has no stem entry; kdzoo's stem tap is block 0's output.

Deviation: mdistiller's constructor ignores ``num_classes`` (its ``fc`` is always 1000-way); here
``num_classes`` is honoured (default 1000, which gives the reference's keys and shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec

_STAGE_BLOCKS = (3, 5, 11, 13)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int, tapped: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=not tapped),  # the BN before it is a pre-activation tap
    )


# (in, out, stride) of the 13 depthwise-separable blocks
_DW = [
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(3, 32, 2)]
        blocks += [_conv_dw(i, o, s, tapped=k + 1 in _STAGE_BLOCKS) for k, (i, o, s) in enumerate(_DW)]
        blocks.append(nn.AvgPool2d(7))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)
        self.tap_spec = TapSpec(
            stem=Tap("model.0"),
            stages=tuple(Tap(f"model.{i}") for i in _STAGE_BLOCKS),
            stages_pre=tuple(Tap(f"model.{i}.4") for i in _STAGE_BLOCKS),
            pooled=Tap("fc", point="input"),
            classifier="fc",
            bn_before_relu=tuple(f"model.{i}.4" for i in _STAGE_BLOCKS),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, 224)
        return self.fc(torch.flatten(self.model(x), 1))


@register_model("MobileNetV1", family="imagenet", input_size=224, description="MobileNetV1 (mdistiller ImageNet)")
def mobilenet_v1(num_classes: int = 1000) -> nn.Module:
    return MobileNetV1(num_classes)

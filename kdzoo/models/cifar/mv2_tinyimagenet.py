"""mdistiller's Tiny-ImageNet MobileNetV2 (``mdistiller/models/cifar/mv2_tinyimagenet.py``).

A different network from the CIFAR ``MobileNetV2``: full width, ReLU6, every conv with a bias, a
1x1 stem conv with padding 1 (the map grows to 66x66 at 64x64 input), stage strides 1,2,2,2,1,1,1
and a 1x1 conv (``conv2``) as classifier on the pooled 1x1 map, so the pooled tap is 4-D
[B, 1280, 1, 1]. Same keys and creation order as the reference (PyTorch default init). No
pre-activation taps (mdistiller returns none for it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_4d
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


class LinearBottleNeck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6):
        super().__init__()
        hidden = in_channels * t
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)
        return out + x if self.use_residual else out


def _stage(repeat: int, in_channels: int, out_channels: int, stride: int, t: int) -> nn.Sequential:
    layers = [LinearBottleNeck(in_channels, out_channels, stride, t)]
    layers += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
    return nn.Sequential(*layers)


class MobileNetV2TinyImageNet(nn.Module):
    def __init__(self, num_classes: int = 200):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.conv2 = nn.Conv2d(1280, num_classes, 1)
        self.tap_spec = TapSpec(
            stem=Tap("pre"),
            stages=(Tap("stage2"), Tap("stage3"), Tap("stage4"), Tap("conv1")),
            stages_pre=None,
            pooled=Tap("conv2", point="input"),  # 4-D [B, 1280, 1, 1], as mdistiller's pooled_feat
            classifier="conv2",
        )

    def forward(self, x: Tensor) -> Tensor:
        check_4d(self, x)
        out = self.pre(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4, self.stage5, self.stage6, self.stage7):
            out = stage(out)
        out = F.adaptive_avg_pool2d(self.conv1(out), 1)
        out = self.conv2(out)
        return out.flatten(1)


@register_model(
    "mv2_tinyimagenet",
    family="tinyimagenet",
    input_size=64,
    description="mdistiller's Tiny-ImageNet MobileNetV2 (full width, ReLU6)",
)
def mobilenetv2_tinyimagenet(num_classes: int = 200) -> nn.Module:
    return MobileNetV2TinyImageNet(num_classes)

"""CIFAR ResNet18/34/50/101/152 of RepDistiller / mdistiller (``models/resnetv2.py``).

3x3 stride-1 stem without max-pool, stages ``layer1..4`` (strides 1, 2, 2, 2), shortcut keys
``shortcut.0/.1``, head ``linear`` after adaptive average pooling (any input size works). Same
parameter tree, creation order and init as the reference. Each block ends with its own
non-in-place activation module: its input is the stage's pre-activation tap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_4d, init_kaiming_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlockV2(nn.Module):
    expansion = 1
    last_bn = "bn2"

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.out_act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_act(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.out_act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_act(out + self.shortcut(x))


class ResNetV2(nn.Module):
    def __init__(
        self,
        block: type[BasicBlockV2] | type[BottleneckV2],
        num_blocks: list[int],
        num_classes: int = 100,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming_fan_out(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlockV2, BottleneckV2)):
                    nn.init.constant_(getattr(m, m.last_bn).weight, 0)
        last = [f"layer{i}.{n - 1}" for i, n in zip((1, 2, 3, 4), num_blocks, strict=True)]
        self.tap_spec = TapSpec(
            stem=Tap("layer1", point="input"),  # the stem's ReLU is functional (reference)
            stages=tuple(Tap(f"layer{i}") for i in (1, 2, 3, 4)),
            stages_pre=tuple(Tap(f"{p}.out_act", point="input") for p in last),
            pooled=Tap("linear", point="input"),
            classifier="linear",
            bn_before_relu=tuple(f"{p}.{block.last_bn}" for p in last),
        )

    def _make_layer(
        self, block: type[BasicBlockV2] | type[BottleneckV2], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_4d(self, x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


_RESNETV2 = {
    "ResNet18": (BasicBlockV2, [2, 2, 2, 2]),
    "ResNet34": (BasicBlockV2, [3, 4, 6, 3]),
    "ResNet50": (BottleneckV2, [3, 4, 6, 3]),
    "ResNet101": (BottleneckV2, [3, 4, 23, 3]),
    "ResNet152": (BottleneckV2, [3, 8, 36, 3]),
}


def _register(name: str, block: type[BasicBlockV2] | type[BottleneckV2], blocks: list[int]) -> None:
    @register_model(name, family="cifar", description=f"CIFAR {name} (RepDistiller resnetv2.py, 3x3 stem, no max-pool)")
    def build(num_classes: int = 100, zero_init_residual: bool = False) -> nn.Module:
        return ResNetV2(block, blocks, num_classes, zero_init_residual)


for _name, (_block, _blocks) in _RESNETV2.items():
    _register(_name, _block, _blocks)

"""CIFAR ResNets of RepDistiller / mdistiller (``models/resnet.py``): resnet8 ... resnet110, x4 variants.

Same parameter tree, creation order and init as the reference, so state_dicts load strictly and a
given seed builds the same initial weights. Differences that own no parameters: every block ends in
its own (non-in-place) activation module, so the pre-activation residual sum is that module's input
and the taps need no ``is_last`` flags or tuple returns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size, init_kaiming_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        # Final activation as a module: its input is the stage's pre-activation tap.
        self.out_act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.out_act(out + residual)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)  # fixed, as the reference: only 32x32 inputs are valid
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_kaiming_fan_out(self)
        self.tap_spec = TapSpec(
            stem=Tap("relu"),
            stages=tuple(Tap(f"layer{i}") for i in (1, 2, 3)),
            stages_pre=tuple(Tap(f"layer{i}.{n - 1}.out_act", point="input") for i in (1, 2, 3)),
            pooled=Tap("fc", point="input"),
            classifier="fc",
            bn_before_relu=tuple(f"layer{i}.{n - 1}.bn2" for i in (1, 2, 3)),
        )

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        # Built before the block, as in the reference, so seeded init consumes the RNG identically.
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, 32)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


_RESNETS = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet14": (14, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet44": (44, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _register(name: str, depth: int, filters: list[int]) -> None:
    @register_model(name, family="cifar", description=f"CIFAR ResNet-{depth}, widths {filters} (RepDistiller)")
    def build(num_classes: int = 100) -> nn.Module:
        return CifarResNet(depth, filters, num_classes)


for _name, (_depth, _filters) in _RESNETS.items():
    _register(_name, _depth, _filters)

"""Wide ResNets of RepDistiller / mdistiller (``models/wrn.py``) and the OFD (overhaul) WRN teachers/students.

Pre-activation blocks (BN -> ReLU -> conv). Parameter tree, creation order and init follow the
reference so checkpoints load strictly and a seed builds the same weights. Differences that own no
parameters: every ReLU is non-in-place, so the stage pre-activation taps (the next unit's ``bn1``
output and the final ``bn1`` output, each evaluated once) are not overwritten afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size, init_normal_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


class WRNBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)  # its input is a pre-activation tap: never overwrite it
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # Only present when the width changes (wrn_*_1 has none in block1): keys must match the reference.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # The reference adds the raw input on identity blocks and the projected activation otherwise.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return torch.add(shortcut, out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=False)  # its input (bn1's output) is the last pre-activation tap
        self.fc = nn.Linear(channels[3], num_classes)
        self.num_channels = channels[3]
        init_normal_fan_out(self, linear_weight_std=None, zero_linear_bias=True)  # RepDistiller zeroes only the fc bias
        pre_bns = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")
        self.tap_spec = TapSpec(
            stem=Tap("conv1"),
            stages=tuple(Tap(f"block{i}") for i in (1, 2, 3)),
            stages_pre=tuple(Tap(path) for path in pre_bns),
            pooled=Tap("fc", point="input"),
            classifier="fc",
            bn_before_relu=pre_bns,
            signed=True,  # stage outputs are raw residual sums
            prepool=Tap("relu"),  # the final BN+ReLU after block3
        )

    def forward(self, x: Tensor) -> Tensor:
        # The reference flattens with view(-1, C): a 64x64 input silently yields 4*B rows. Refuse it.
        check_input_size(self, x, 32)
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(torch.flatten(out, 1))


_WRNS = {
    # RepDistiller / mdistiller registry names
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
    # OFD (clovaai/overhaul-distillation) CIFAR-100 teachers and students
    "wrn_28_4": (28, 4),
    "wrn_16_4": (16, 4),
    "wrn_28_2": (28, 2),
}


def _register(name: str, depth: int, widen: int) -> None:
    @register_model(name, family="cifar", description=f"Wide ResNet-{depth}-{widen} (RepDistiller / OFD)")
    def build(num_classes: int = 100, drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(depth, num_classes, widen, drop_rate)


for _name, (_depth, _widen) in _WRNS.items():
    _register(_name, _depth, _widen)

"""ShuffleNetV1 of RepDistiller / mdistiller (``models/ShuffleNetv1.py``): ``ShuffleV1`` (groups 3).

Same keys and creation order as the reference (PyTorch default init). Each bottleneck ends with its
own non-in-place activation module, so a stage's pre-activation tap is that module's input in the
stage's last block (always a stride-1 add, never the stride-2 concat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        first_groups = 1 if in_planes == 24 else groups  # the network's very first 1x1 conv is ungrouped
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.out_act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.out_act(preact)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.tap_spec = TapSpec(
            stem=Tap("layer1", point="input"),  # the stem's ReLU is functional (reference)
            stages=tuple(Tap(f"layer{i}") for i in (1, 2, 3)),
            stages_pre=tuple(
                Tap(f"layer{i}.{n - 1}.out_act", point="input") for i, n in zip((1, 2, 3), num_blocks, strict=True)
            ),
            pooled=Tap("linear", point="input"),
            classifier="linear",
        )

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The stride-2 first block concatenates its input (pooled) to the branch output.
            branch_planes = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(ShuffleBottleneck(self.in_planes, branch_planes, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, 32)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


@register_model("ShuffleV1", family="cifar", description="ShuffleNetV1 g=3, out planes 240/480/960 (RepDistiller)")
def shuffle_v1(num_classes: int = 100) -> nn.Module:
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)

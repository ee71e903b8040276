"""ShuffleNetV2 of RepDistiller / mdistiller (``models/ShuffleNetv2.py``): ``ShuffleV2`` and SimKD's ``ShuffleV2_1_5``.

Same keys and creation order as the reference (PyTorch default init). The pre-activation tap of a
stage is ``concat(first input half, bn3 output)`` *before* the channel shuffle: each basic block
passes that concat through an ``nn.Identity`` marker (``preact``) whose output is tapped; the block
then applies its own activation module and the shuffle. ReLU of the concat equals the reference's
concat of ReLU because the first half is already non-negative (it is a ReLU output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size
from kdzoo.models.cifar.shufflenetv1 import ChannelShuffle
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec

_CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
}


class SplitHalf(nn.Module):
    def __init__(self, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class ShuffleV2Block(nn.Module):
    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitHalf(split_ratio)
        ch = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, groups=ch, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()  # tap marker: the concat before activation and shuffle
        self.out_act = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        pre = self.preact(torch.cat([x1, out], 1))
        return self.shuffle(self.out_act(pre))


class ShuffleV2DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, net_size: float = 1, num_classes: int = 100):
        super().__init__()
        if net_size not in _CONFIGS:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(_CONFIGS)}, got {net_size}")
        out_channels, num_blocks = _CONFIGS[net_size]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.tap_spec = TapSpec(
            stem=Tap("layer1", point="input"),  # the stem's ReLU is functional (reference)
            stages=tuple(Tap(f"layer{i}") for i in (1, 2, 3)),
            # layerK = [down block, n basic blocks]: the last basic block sits at index n
            stages_pre=tuple(Tap(f"layer{i}.{n}.preact") for i, n in zip((1, 2, 3), num_blocks, strict=True)),
            pooled=Tap("linear", point="input"),
            classifier="linear",
            prepool=Tap("bn2", transform="relu"),  # the last 1x1 conv's BN, then a functional ReLU
        )

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, 32)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


@register_model("ShuffleV2", family="cifar", description="ShuffleNetV2 x1, channels 116/232/464/1024 (RepDistiller)")
def shuffle_v2(num_classes: int = 100) -> nn.Module:
    return ShuffleNetV2(net_size=1, num_classes=num_classes)


@register_model("ShuffleV2_1_5", family="cifar", description="ShuffleNetV2 x1.5, channels 176/352/704/1024 (SimKD)")
def shuffle_v2_1_5(num_classes: int = 100) -> nn.Module:
    return ShuffleNetV2(net_size=1.5, num_classes=num_classes)

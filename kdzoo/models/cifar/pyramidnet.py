"""PyramidNet of OFD (clovaai/overhaul-distillation ``CIFAR-100/models/PyramidNet.py``).

``pyramidnet200`` (depth 200, alpha 240, bottleneck) is OFD's teacher for settings e/f,
``pyramidnet110`` (depth 110, alpha 84, basic blocks) its student for setting f. Same parameter
tree, creation order and init as the reference. Differences that own no parameters: the
zero-padding of the widening shortcut is allocated on the input's device and dtype (the reference
hard-codes ``torch.cuda.FloatTensor`` and cannot run on CPU); every activation is its own
non-in-place module, so the pre-activation taps are plain BN outputs:

* basic blocks: ``layer{2,3}.0.bn1`` and ``bn_final`` (the next unit's first BN),
* bottleneck: ``layer{2,3}.0.bn2`` (= ``bn2(conv1(bn1(f)))`` of the next stage's first block) and
  ``bn_final`` — OFD's ``extract_feature(preReLU=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size, init_normal_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec


def _add_padded_shortcut(out: Tensor, shortcut: Tensor) -> Tensor:
    extra = out.shape[1] - shortcut.shape[1]
    if extra:
        # Zero channels appended after the shortcut's: on the input's device and dtype.
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
    return out + shortcut


class PyramidBasicBlock(nn.Module):
    outchannel_ratio = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.bn3(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return _add_padded_shortcut(out, shortcut)


class PyramidBottleneck(nn.Module):
    outchannel_ratio = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.outchannel_ratio, kernel_size=1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.outchannel_ratio)
        # The reference calls one in-place `relu` twice; one non-in-place module per call here.
        self.relu = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu2(self.bn3(out)))
        out = self.bn4(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return _add_padded_shortcut(out, shortcut)


class PyramidNet(nn.Module):
    def __init__(self, depth: int, alpha: int, num_classes: int = 100, bottleneck: bool = False):
        super().__init__()
        block: type[PyramidBasicBlock] | type[PyramidBottleneck]
        if bottleneck:
            n, block = (depth - 2) // 9, PyramidBottleneck
        else:
            n, block = (depth - 2) // 6, PyramidBasicBlock
        self.inplanes = 16
        self.addrate = alpha / (3 * n * 1.0)
        self.input_featuremap_dim = self.inplanes
        self.conv1 = nn.Conv2d(3, self.input_featuremap_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.input_featuremap_dim)
        self.featuremap_dim: float = self.input_featuremap_dim
        self.layer1 = self._make_layer(block, n)
        self.layer2 = self._make_layer(block, n, stride=2)
        self.layer3 = self._make_layer(block, n, stride=2)
        self.final_featuremap_dim = self.input_featuremap_dim
        self.bn_final = nn.BatchNorm2d(self.final_featuremap_dim)
        self.relu_final = nn.ReLU(inplace=False)  # its input is the last pre-activation tap
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(self.final_featuremap_dim, num_classes)
        init_normal_fan_out(self, linear_weight_std=None, zero_linear_bias=False)  # official: fc left at PyTorch's init
        pre_bn = "bn2" if bottleneck else "bn1"
        pre = (f"layer2.0.{pre_bn}", f"layer3.0.{pre_bn}", "bn_final")
        self.tap_spec = TapSpec(
            stem=Tap("bn1"),  # conv1 -> bn1, no activation before layer1 (reference)
            stages=tuple(Tap(f"layer{i}") for i in (1, 2, 3)),
            stages_pre=tuple(Tap(p) for p in pre),
            pooled=Tap("fc", point="input"),
            classifier="fc",
            bn_before_relu=pre,
            signed=True,  # stage outputs are raw residual sums (pre-activation network)
            prepool=Tap("avgpool", point="input"),  # after the final BN+ReLU
        )

    def _make_layer(
        self, block: type[PyramidBasicBlock] | type[PyramidBottleneck], block_depth: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = nn.AvgPool2d((2, 2), stride=(2, 2), ceil_mode=True) if stride != 1 else None
        # Float accumulation of the widths kept exactly as the reference (rounding decides the widths).
        self.featuremap_dim = self.featuremap_dim + self.addrate
        layers = [block(self.input_featuremap_dim, int(round(self.featuremap_dim)), stride, downsample)]
        for _ in range(1, block_depth):
            next_dim = self.featuremap_dim + self.addrate
            layers.append(block(int(round(self.featuremap_dim)) * block.outchannel_ratio, int(round(next_dim)), 1))
            self.featuremap_dim = next_dim
        self.input_featuremap_dim = int(round(self.featuremap_dim)) * block.outchannel_ratio
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, 32)
        out = self.bn1(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu_final(self.bn_final(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


@register_model("pyramidnet200", family="cifar", description="PyramidNet-200, alpha 240, bottleneck (OFD teacher)")
def pyramidnet200(num_classes: int = 100) -> nn.Module:
    return PyramidNet(200, 240, num_classes, bottleneck=True)


@register_model("pyramidnet110", family="cifar", description="PyramidNet-110, alpha 84, basic blocks (OFD student)")
def pyramidnet110(num_classes: int = 100) -> nn.Module:
    return PyramidNet(110, 84, num_classes, bottleneck=False)

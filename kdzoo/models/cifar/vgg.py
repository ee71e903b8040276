"""VGG-BN of RepDistiller / mdistiller (``models/vgg.py``): vgg8, vgg11, vgg13, vgg16, vgg19 (``*_bn``).

Each ``blockK`` is conv(bias)+BN+ReLU repeated, with the block's last ReLU removed, exactly as the
reference (same keys). The ReLUs between blocks, functional in the reference, are explicit
non-in-place modules ``act0..act4`` here: their inputs are the pre-activation taps (the BN ending
each block), their outputs the post-activation taps. ``pool3`` runs only at 64x64 input, as in the
reference (at 32x32 blocks 3 and 4 both run at 4x4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdzoo.models.cifar.common import check_input_size, init_normal_fan_out
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec

_CFGS: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: list[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the block's final ReLU lives outside (act modules)


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(cfg[0], 3, batch_norm)
        self.block1 = _make_block(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_block(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_block(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_block(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for i in range(5):
            self.add_module(f"act{i}", nn.ReLU(inplace=False))
        init_normal_fan_out(self, linear_weight_std=0.01, zero_linear_bias=True)
        self.tap_spec = TapSpec(
            stem=Tap("act0"),
            stages=tuple(Tap(f"act{i}") for i in (1, 2, 3, 4)),
            stages_pre=tuple(Tap(f"block{i}") for i in (1, 2, 3, 4)),
            pooled=Tap("classifier", point="input"),
            classifier="classifier",
            bn_before_relu=tuple(f"block{i}.{len(self.get_submodule(f'block{i}')) - 1}" for i in (1, 2, 3, 4))
            if batch_norm
            else None,
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, x, (32, 64))
        height = x.shape[2]
        x = self.pool0(self.act0(self.block0(x)))
        x = self.pool1(self.act1(self.block1(x)))
        x = self.pool2(self.act2(self.block2(x)))
        x = self.act3(self.block3(x))
        if height == 64:  # reference quirk kept for parity: no pool3 at 32x32
            x = self.pool3(x)
        x = self.act4(self.block4(x))
        x = torch.flatten(self.pool4(x), 1)
        return self.classifier(x)


_VGGS = {"vgg8": "S", "vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _register(name: str, cfg_key: str) -> None:
    @register_model(name, family="cifar", aliases=(f"{name}_bn",), description=f"VGG-BN cfg {cfg_key} (RepDistiller)")
    def build(num_classes: int = 100) -> nn.Module:
        return VGG(_CFGS[cfg_key], batch_norm=True, num_classes=num_classes)


for _name, _cfg in _VGGS.items():
    _register(_name, _cfg)

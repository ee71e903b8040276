"""CIFAR ResNets that only SimKD (DefangChen/SimKD ``models/resnet.py``) registers.

Same architecture and state_dict keys as RepDistiller's CIFAR ResNet (``resnet.py``); SimKD pools
with ``AdaptiveAvgPool2d(1)``, which at 32x32 equals ``AvgPool2d(8)`` up to float rounding.
"""

from __future__ import annotations

from torch import nn

from kdzoo.models.cifar.resnet import CifarResNet
from kdzoo.models.registry import register_model

_SIMKD_RESNETS = {
    "resnet38": (38, [16, 16, 32, 64]),
    "resnet116": (116, [16, 16, 32, 64]),
    "resnet14x2": (14, [16, 32, 64, 128]),
    "resnet38x2": (38, [16, 32, 64, 128]),
    "resnet110x2": (110, [16, 32, 64, 128]),
    "resnet14x4": (14, [32, 64, 128, 256]),
    "resnet38x4": (38, [32, 64, 128, 256]),
}


def _register(name: str, depth: int, filters: list[int]) -> None:
    @register_model(name, family="cifar", description=f"CIFAR ResNet-{depth}, widths {filters} (SimKD)")
    def build(num_classes: int = 100) -> nn.Module:
        return CifarResNet(depth, filters, num_classes)


for _name, (_depth, _filters) in _SIMKD_RESNETS.items():
    _register(_name, _depth, _filters)

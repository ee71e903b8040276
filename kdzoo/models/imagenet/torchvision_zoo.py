"""torchvision's ImageNet ResNets and MobileNetV2 under kdzoo names (random init, ``weights=None``).

mdistiller's ImageNet ResNets have exactly torchvision's keys, order and shapes (docs/models.md), so
these also load mdistiller / torchvision ImageNet checkpoints strictly. Taps: docs/models.md, "Foreign models".
"""

from __future__ import annotations

from torch import nn

from kdzoo.models.foreign import derive_tap_spec
from kdzoo.models.registry import register_model

_TORCHVISION = {
    "tv_resnet18": "resnet18",
    "tv_resnet34": "resnet34",
    "tv_resnet50": "resnet50",
    "tv_resnet101": "resnet101",
    "tv_resnet152": "resnet152",
    "tv_mobilenet_v2": "mobilenet_v2",
}


def _register(name: str, arch: str) -> None:
    @register_model(name, family="imagenet", input_size=224, description=f"torchvision {arch} (random init)")
    def build(num_classes: int = 1000) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        model.tap_spec = derive_tap_spec(model)  # type: ignore[assignment]
        return model


for _name, _arch in _TORCHVISION.items():
    _register(_name, _arch)

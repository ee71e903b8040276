"""ImageNet-size models: what torchvision / timm lack (MobileNetV1), and torchvision's under kdzoo names."""

from kdzoo.models.imagenet import mobilenetv1, torchvision_zoo  # noqa: F401

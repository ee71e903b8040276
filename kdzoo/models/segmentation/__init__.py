"""Semantic-segmentation models: OFD's DeepLabV3+ (ResNet-18/50/101, MobileNetV2) and torchvision's
segmentation models under kdzoo's ``forward(x) -> logits`` contract."""

from kdzoo.models.segmentation import deeplab, torchvision_seg  # noqa: F401

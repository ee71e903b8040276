"""DeepLabV3+ of clovaai/overhaul-distillation (``Segmentation/modeling/deeplab.py``, ``aspp.py``, ``decoder.py``,
derived from jfzhang95/pytorch-deeplab-xception), the segmentation teachers and students of OFD.

State_dict keys, creation order and init are the official ones, so OFD / pytorch-deeplab-xception checkpoints
(``torch.save({'epoch', 'state_dict', 'optimizer', 'best_pred'})``, ``module.`` prefixed under DataParallel) load
strictly through :func:`kdzoo.models.checkpoint.load_checkpoint`. SynchronizedBatchNorm2d there is a drop-in for
BatchNorm2d with the same keys; plain BatchNorm2d here (DDP's SyncBatchNorm conversion covers the multi-GPU case).

Taps (``tap_spec``): the six maps of the official ``extract_feature`` (4 backbone stages, the ASPP projection
after ``aspp.bn1``, the decoder after ``decoder.last_conv[5]``) as ``stages_pre``; their activations as ``stages``;
``bn_before_relu`` = ``get_bn_before_relu()``; ``pooled`` = the globally pooled backbone output of the ASPP's
image-level branch; ``classifier`` = the decoder's last 1x1 conv, so the ``dense_logits`` tap is the class-score
map before the upsampling to the input size. ``head_modules`` names what ``get_10x_lr_params`` trains at 10x lr.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.models.registry import register_model
from kdzoo.models.segmentation.backbones import (
    BasicBlock,
    Bottleneck,
    MobileNetV2Backbone,
    ResNetBackbone,
    check_output_stride,
    load_imagenet_backbone,
)
from kdzoo.models.taps import Tap, TapSpec


def _kaiming_init(module: nn.Module) -> None:
    """aspp.py / decoder.py ``_init_weight``: kaiming_normal_ (fan_in) conv weights, BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


class _ASPPBranch(nn.Module):
    """aspp.py ``_ASPPModule``: atrous conv, BN, ReLU."""

    def __init__(self, inplanes: int, kernel_size: int, dilation: int):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(inplanes, 256, kernel_size, 1, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(256)
        self.relu = nn.ReLU()
        _kaiming_init(self)  # the official initialises each branch at creation (and the ASPP again at the end)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, inplanes: int, output_stride: int = 16):
        super().__init__()
        # aspp.py: rates [1, 6, 12, 18] at output stride 16, [1, 12, 24, 36] at 8
        rates = (1, 6, 12, 18) if check_output_stride(output_stride) == 16 else (1, 12, 24, 36)
        self.aspp1 = _ASPPBranch(inplanes, 1, rates[0])
        self.aspp2 = _ASPPBranch(inplanes, 3, rates[1])
        self.aspp3 = _ASPPBranch(inplanes, 3, rates[2])
        self.aspp4 = _ASPPBranch(inplanes, 3, rates[3])
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(inplanes, 256, 1, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(256)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)]
        pooled = self.global_avg_pool(x)
        branches.append(F.interpolate(pooled, size=branches[3].shape[2:], mode="bilinear", align_corners=True))
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(branches, dim=1)))))


class Decoder(nn.Module):
    def __init__(self, num_classes: int, low_level_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_channels, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(304, 256, 3, 1, 1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, 1, 1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(256, num_classes, 1, 1),
        )
        _kaiming_init(self)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((x, low_level), dim=1))


class DeepLabV3Plus(nn.Module):
    """``forward(x)`` -> class scores at the input resolution (bilinear, ``align_corners=True``)."""

    # deeplab.py get_10x_lr_params: the ASPP and the decoder train at 10x the backbone's lr
    head_modules = ("aspp", "decoder")

    def __init__(self, backbone: ResNetBackbone | MobileNetV2Backbone, num_classes: int = 21,
                 output_stride: int = 16):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, output_stride)
        self.decoder = Decoder(num_classes, backbone.low_level_channels)
        self.tap_spec = _tap_spec(backbone)

    def forward(self, x: Tensor) -> Tensor:
        feat, low_level = self.backbone(x)
        out = self.decoder(self.aspp(feat), low_level)
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=True)


def _tap_spec(backbone: ResNetBackbone | MobileNetV2Backbone) -> TapSpec:
    inner = backbone.taps()

    def outer(tap: Tap) -> Tap:
        return replace(tap, module=f"backbone.{tap.module}")

    return TapSpec(
        stem=outer(inner.stem),
        # ASPP: after its projection's ReLU, before the dropout; decoder: last_conv's 2nd ReLU (index 6)
        stages=(*map(outer, inner.stages), Tap("aspp.relu"), Tap("decoder.last_conv.6")),
        stages_pre=(*map(outer, inner.stages_pre), Tap("aspp.bn1"), Tap("decoder.last_conv.5")),
        bn_before_relu=(*(f"backbone.{b}" for b in inner.bn_before_relu), "aspp.bn1", "decoder.last_conv.5"),
        pooled=Tap("aspp.global_avg_pool.0", transform="flatten"),
        prepool=Tap("aspp.global_avg_pool.0", point="input"),
        classifier="decoder.last_conv.8",
        signed=inner.signed,
    )


def _build(backbone: ResNetBackbone | MobileNetV2Backbone, num_classes: int, output_stride: int,
           backbone_checkpoint: str | Path | None) -> DeepLabV3Plus:
    if backbone_checkpoint is not None:  # the official loads ImageNet weights before building the ASPP
        load_imagenet_backbone(backbone, backbone_checkpoint)
    return DeepLabV3Plus(backbone, num_classes, output_stride)


@register_model("deeplabv3plus_resnet18", family="segmentation", input_size=513)
def deeplabv3plus_resnet18(num_classes: int = 21, output_stride: int = 16,
                           backbone_checkpoint: str | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ with OFD's ResNet-18 backbone (16.6M parameters at 21 classes)."""
    backbone = ResNetBackbone(BasicBlock, (2, 2, 2, 2), output_stride)
    return _build(backbone, num_classes, output_stride, backbone_checkpoint)


@register_model("deeplabv3plus_resnet50", family="segmentation", input_size=513)
def deeplabv3plus_resnet50(num_classes: int = 21, output_stride: int = 16,
                           backbone_checkpoint: str | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ with a ResNet-50 backbone in OFD's layout (multi-grid layer4, 256 low-level channels)."""
    backbone = ResNetBackbone(Bottleneck, (3, 4, 6, 3), output_stride)
    return _build(backbone, num_classes, output_stride, backbone_checkpoint)


@register_model("deeplabv3plus_resnet101", family="segmentation", input_size=513)
def deeplabv3plus_resnet101(num_classes: int = 21, output_stride: int = 16,
                            backbone_checkpoint: str | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ with OFD's ResNet-101 backbone (59.3M parameters at 21 classes), OFD's segmentation teacher."""
    backbone = ResNetBackbone(Bottleneck, (3, 4, 23, 3), output_stride)
    return _build(backbone, num_classes, output_stride, backbone_checkpoint)


@register_model("deeplabv3plus_mobilenetv2", family="segmentation", input_size=513)
def deeplabv3plus_mobilenetv2(num_classes: int = 21, output_stride: int = 16,
                              backbone_checkpoint: str | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ with pytorch-deeplab-xception's MobileNetV2 backbone (5.8M parameters at 21 classes)."""
    backbone = MobileNetV2Backbone(output_stride)
    return _build(backbone, num_classes, output_stride, backbone_checkpoint)

"""DeepLabV3+ backbones in the overhaul-distillation layout.

Facts from clovaai/overhaul-distillation ``Segmentation/modeling/backbone/resnet.py`` and ``mobilenet.py``
(derived from jfzhang95/pytorch-deeplab-xception): module names, creation order and init are theirs, so
their checkpoints load strictly and a seed gives the same initial weights.

* ResNet: OFD moved each residual block's final ReLU to the start of the next block (``F.relu`` on the
  block input), so a stage output is the pre-ReLU sum; the backbone applies ``F.relu`` to layer4's output
  and to layer1's output (the low-level feature). Same numbers as a standard ResNet, but the pre-ReLU maps
  sit on module boundaries (forward hooks read them). layer4 is ``_make_layer`` for BasicBlock and the
  multi-grid unit (dilations [1, 2, 4] x the stage dilation) for Bottleneck.
* MobileNetV2: ``features`` Sequential; each InvertedResidual pads its input explicitly (``fixed_padding``)
  and runs all its convs unpadded. ``low_level_features`` / ``high_level_features`` are registered slices
  of ``features`` (the same modules), so the official state_dict lists those weights three times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import CheckpointError, UserInputError
from kdzoo.models.checkpoint import compare_state_dicts, imagenet_backbone_state, mismatch_report
from kdzoo.models.taps import Tap


def check_output_stride(output_stride: int) -> int:
    if output_stride not in (8, 16):
        raise UserInputError(f"DeepLabV3+ supports output_stride 8 or 16 (the official code's), got {output_stride!r}")
    return output_stride


@dataclass(frozen=True)
class BackboneTaps:
    """Tap positions inside a backbone (paths relative to it); DeepLabV3Plus prefixes ``backbone.``."""

    stem: Tap
    stages: tuple[Tap, ...]
    stages_pre: tuple[Tap, ...]
    bn_before_relu: tuple[str, ...]
    signed: bool


def _init_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


# --------------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)  # the previous block's output ReLU (OFD layout); the output below stays pre-ReLU
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)  # as BasicBlock
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


class ResNetBackbone(nn.Module):
    """ResNet-18/50/101 of OFD's ``backbone/resnet.py``; ``forward`` returns (relu(layer4), relu(layer1))."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 output_stride: int = 16):
        super().__init__()
        # resnet.py: output stride 16 -> strides [1, 2, 2, 1], dilations [1, 1, 1, 2]; 8 -> [1, 2, 1, 1], [1, 1, 2, 4]
        strides, dilations = ((1, 2, 2, 1), (1, 1, 1, 2)) if check_output_stride(output_stride) == 16 else (
            (1, 2, 1, 1), (1, 1, 2, 4))
        self.block = block
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            if i == 3 and block is Bottleneck:
                block_dilations = [g * dilations[3] for g in (1, 2, 4)]  # the multi-grid unit, _make_MG_unit
            else:
                block_dilations = [dilations[i]] * layers[i]  # _make_layer: every block, the first included
            setattr(self, f"layer{i + 1}", self._stage(block, inplanes, planes, strides[i], block_dilations))
            inplanes = planes * block.expansion
        self.out_channels = 512 * block.expansion
        self.low_level_channels = 64 * block.expansion
        for m in self.modules():  # resnet.py _init_weight: normal(0, sqrt(2 / (k*k*out_channels)))
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
        _init_bn(self)

    @staticmethod
    def _stage(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, stride: int,
               dilations: list[int]) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:  # created before the blocks, as the official
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(inplanes, planes, stride, dilations[0], downsample)]
        blocks += [block(planes * block.expansion, planes, 1, d) for d in dilations[1:]]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        low_level = F.relu(x)
        x = self.layer4(self.layer3(self.layer2(x)))
        return F.relu(x), low_level

    def taps(self) -> BackboneTaps:
        last_bn = "bn3" if self.block is Bottleneck else "bn2"
        layers = [f"layer{i}" for i in (1, 2, 3, 4)]
        return BackboneTaps(
            stem=Tap("relu"),
            # The ReLUs after the stage outputs are functional (next block's / forward's F.relu): same values.
            stages=tuple(Tap(name, transform="relu") for name in layers),
            stages_pre=tuple(Tap(name) for name in layers),  # extract_feature's feat1..feat4
            bn_before_relu=tuple(f"{name}.{len(getattr(self, name)) - 1}.{last_bn}" for name in layers),
            signed=False,
        )

    def imagenet_target(self) -> tuple[nn.Module, str, Callable[[str], bool]]:
        """torchvision's ImageNet files (resnet18-5c106cde.pth, resnet101-5d3b4d8f.pth): same keys, plus ``fc``."""
        return self, "", lambda key: key.startswith("fc.")


# --------------------------------------------------------------------------------------------------- MobileNetV2

# mobilenet.py's interverted_residual_setting: expansion t, channels c, repeats n, stride s
_MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                         (6, 320, 1, 1))
# Blocks whose expansion output OFD reads before its ReLU6 (get_bn_before_relu: features[4], [7], [14]) and the
# last block, whose linear output is the 4th backbone feature.
_MOBILENETV2_TAPPED = (4, 7, 14)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, dilation: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        # fixed_padding for a 3x3 kernel: effective size 2*dilation + 1, i.e. `dilation` pixels on every side.
        self.pad = dilation
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=False)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 0, dilation, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=False),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # The whole block (the 1x1 expansion too) runs on the padded map, as mobilenet.py's InvertedResidual.
        out = self.conv(F.pad(x, (self.pad, self.pad, self.pad, self.pad)))
        return x + out if self.use_res_connect else out


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 of pytorch-deeplab-xception / OFD; ``forward`` returns (output, features[0:4] output)."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        check_output_stride(output_stride)
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=False))
        ]
        current_stride, rate, inp = 2, 1, 32
        for t, c, n, s in _MOBILENETV2_SETTINGS:
            if current_stride == output_stride:  # resolution fixed from here on: stride becomes dilation
                stride, dilation = 1, rate
                rate *= s
            else:
                stride, dilation = s, 1
                current_stride *= s
            for i in range(n):
                blocks.append(InvertedResidual(inp, c, stride if i == 0 else 1, dilation, t))
                inp = c
        self.features = nn.Sequential(*blocks)
        for m in self.modules():  # mobilenet.py _initialize_weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        _init_bn(self)
        # Registered aliases of the same modules, as the official: they put these keys into the state_dict.
        self.low_level_features = self.features[0:4]
        self.high_level_features = self.features[4:]
        self.out_channels = 320
        self.low_level_channels = 24

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low_level = self.low_level_features(x)
        return self.high_level_features(low_level), low_level

    def taps(self) -> BackboneTaps:
        last = len(self.features) - 1
        # The official extract_feature re-runs features[k].conv[0:2] on the unpadded map; the 1x1 conv + BN are
        # pointwise, so the padded output without its `pad` border holds the same values (eval mode; in train
        # mode BN's batch statistics include the border) and no BatchNorm runs twice.
        pads = {k: self.features[k].pad for k in _MOBILENETV2_TAPPED}
        return BackboneTaps(
            stem=Tap("features.0"),
            stages=(*(Tap(f"features.{k}.conv.2", crop=pads[k]) for k in _MOBILENETV2_TAPPED), Tap(f"features.{last}")),
            stages_pre=(*(Tap(f"features.{k}.conv.1", crop=pads[k]) for k in _MOBILENETV2_TAPPED),
                        Tap(f"features.{last}")),
            bn_before_relu=(*(f"features.{k}.conv.1" for k in _MOBILENETV2_TAPPED), f"features.{last}.conv.7"),
            signed=True,  # the last block's output is a linear bottleneck
        )

    def imagenet_target(self) -> tuple[nn.Module, str, Callable[[str], bool]]:
        """The ImageNet file pytorch-deeplab-xception loads (mobilenet_v2-6a65762b.pth: ``features.*`` with the
        1280-channel ``features.18`` conv, and ``classifier.1``): the head is what DeepLab drops."""
        n = len(self.features)

        def is_head(key: str) -> bool:
            parts = key.split(".")
            beyond = parts[0] == "features" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= n
            return beyond or parts[0] in ("classifier", "fc")

        return self.features, "features.", is_head


# --------------------------------------------------------------------------------------------------- ImageNet weights


def load_imagenet_backbone(backbone: ResNetBackbone | MobileNetV2Backbone, path: str | Path) -> None:
    """Load an ImageNet classifier file into ``backbone`` strictly: every backbone weight must be in the file with
    its shape; only the ImageNet head may be extra (the official code's ``_load_pretrained_model`` silently skips
    whatever does not fit; here a file of another architecture is an error naming the keys)."""
    target, prefix, is_head = backbone.imagenet_target()
    own, unexpected, _ = imagenet_backbone_state(path, prefix, is_head)
    missing, extra, mismatched = compare_state_dicts(target.state_dict(), own)
    unexpected += [prefix + k for k in extra]
    if missing or unexpected or mismatched:
        parts = [f"backbone checkpoint {path} does not fit the {type(backbone).__name__} (every backbone weight must "
                 "be in the file with its shape; only the ImageNet classifier may be extra).",
                 *mismatch_report(prefix, missing, unexpected, mismatched)]
        raise CheckpointError(" ".join(p for p in parts if p))
    target.load_state_dict(own, strict=True)

"""Registered detectors: torchvision's Faster R-CNN (ResNet-18/50/101 and MobileNetV2 FPN), RetinaNet and FCOS.

Every model is an unmodified torchvision ``FasterRCNN`` / ``RetinaNet`` / ``FCOS`` instance: ``model(images, targets)``
returns torchvision's loss dict in train mode and its detections in eval mode, and state_dict keys are exactly
torchvision's, so torchvision's COCO weight files load (:func:`load_detection_checkpoint`).

The backbone is built as torchvision's ``fasterrcnn_resnet50_fpn`` builds it when it starts from ImageNet weights
(torchvision/models/detection/faster_rcnn.py): ``FrozenBatchNorm2d`` everywhere in the body and the first
``5 - trainable_backbone_layers`` stages frozen. Nothing is ever downloaded: the ImageNet weights come from
``backbone_checkpoint``, a torchvision classification file (``resnet50-0676ba61.pth``, ``mobilenet_v2-b0353104.pth``),
loaded strictly into the body. torchvision itself switches to trainable ``BatchNorm2d`` when built without weights;
kdzoo keeps FrozenBN by default in both cases because detection batches (2 images per GPU) are too small for batch
statistics (Detectron2's ``RESNETS.NORM = "FrozenBN"`` default, which megvii-research/mdistiller ``detection/`` trains
with); ``norm="bn"`` gives the trainable BatchNorm of a from-scratch body (``kdzoo demo --task detection``).

FPN levels (the ``OrderedDict`` the backbone returns):

* Faster R-CNN, ResNet: ``'0'..'3'`` = P2..P5 on layer1..layer4 (strides 4, 8, 16, 32) and ``'pool'`` = P6 (stride
  64, max-pooled P5), 256 channels each; the RPN uses all five, the ROI pooler ``'0'..'3'``.
* Faster R-CNN, MobileNetV2: the same five levels, on the last block of the 24/32/96/320-channel groups
  (``features.3/6/13/17``, strides 4/8/16/32): mdistiller's ``detection/model/backbone/mobilenetv2.py`` m2..m5, whose
  FPN is built like the ResNet one. torchvision's own ``mobilenet_backbone`` accepts ``mobilenet_v2`` but taps the
  *first* block of each strided group and defaults to its last two (both stride 32), so it is not used here. The
  1280-channel ``features.18`` conv is not part of the body (m5 ends before it).
* RetinaNet / FCOS: torchvision's ``'0'..'2'`` = P3..P5 on layer2..layer4 and ``'p6'``, ``'p7'`` (``LastLevelP6P7`` on
  P5, torchvision's v1 builders).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from kdzoo.errors import CheckpointError, UserInputError
from kdzoo.models.checkpoint import (
    compare_state_dicts,
    imagenet_backbone_state,
    load_checkpoint,
    mismatch_report,
    register_state_dict_upgrade,
)
from kdzoo.models.foreign import safe_inplace, torchvision_resnet_pre_taps
from kdzoo.models.registry import register_model
from kdzoo.models.taps import Tap, TapSpec, register_tap_resolver

# torchvision's MobileNetV2 table (t, c, n, s): the runs of 24, 32, 96 and 320 channels end at these ``features``
# indices; mdistiller's m2..m5.
MOBILENET_V2_STAGE_ENDS = (3, 6, 13, 17)
MOBILENET_V2_STAGE_CHANNELS = (24, 32, 96, 320)
# The blocks each ``trainable_backbone_layers`` step unfreezes, counted from the top like torchvision's ResNet
# ``["layer4", "layer3", "layer2", "layer1", "conv1"]``: m5, m4, m3, m2, then the stem and the first block.
_MOBILENET_V2_STAGE_STARTS = (14, 7, 4, 2, 0)
MinSize = int | tuple[int, ...] | list[int]
ROI_POOL_SIZE = 7  # torchvision's FasterRCNN MultiScaleRoIAlign output_size (Detectron2 POOLER_RESOLUTION)


def _check_trainable(trainable_backbone_layers: int) -> int:
    if not isinstance(trainable_backbone_layers, int) or not 0 <= trainable_backbone_layers <= 5:
        raise UserInputError(
            f"trainable_backbone_layers must be an integer in [0, 5] (torchvision's range), got "
            f"{trainable_backbone_layers!r}"
        )
    return trainable_backbone_layers


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def _norm_layer(norm: str) -> type[nn.Module]:
    """The body's normalisation: ``frozen_bn`` (Detectron2's ``RESNETS.NORM`` default, the setting for a body that
    starts from ImageNet weights) or ``bn``, trainable BatchNorm, which torchvision's builders use when a detector
    has no pretrained weights (training from scratch needs normalisation: He, Girshick, Dollar, "Rethinking
    ImageNet Pre-training", ICCV 2019)."""
    if norm not in NORMS:
        raise UserInputError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm]


def _check_sizes(num_classes: int, min_size: MinSize, max_size: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserInputError(f"a detector needs num_classes >= 2 (background + at least one class), got "
                             f"{num_classes!r}")
    # A sequence of min sizes is torchvision's multi-scale training (one drawn per batch; eval uses the last), as
    # mdistiller's INPUT.MIN_SIZE_TRAIN (640, 672, ..., 800).
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    if not sizes or not all(isinstance(s, int) and 0 < s <= max_size for s in sizes):
        raise UserInputError(f"detector sizes need 0 < min_size <= max_size (min_size an integer or a list of "
                             f"them), got min_size={min_size!r}, max_size={max_size!r}")


# --------------------------------------------------------------------------------------------------- backbones


def _resnet_fpn(depth: int, trainable_backbone_layers: int, one_stage: bool, norm: str) -> BackboneWithFPN:
    kwargs: dict[str, Any] = {}
    if one_stage:  # torchvision's retinanet_resnet50_fpn / fcos_resnet50_fpn: P3-P5 plus P6, P7 on P5
        kwargs = {"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)}
    return resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=_norm_layer(norm),
                               trainable_layers=trainable_backbone_layers, **kwargs)


def _mobilenet_v2_fpn(trainable_backbone_layers: int, norm: str) -> BackboneWithFPN:
    features = mobilenet_v2(weights=None, norm_layer=_norm_layer(norm)).features
    widths = [features[i].out_channels for i in MOBILENET_V2_STAGE_ENDS]
    assert tuple(widths) == MOBILENET_V2_STAGE_CHANNELS, widths  # torchvision changed its MobileNetV2 table
    frozen_until = len(features) if trainable_backbone_layers == 0 else \
        _MOBILENET_V2_STAGE_STARTS[trainable_backbone_layers - 1]
    for block in features[:frozen_until]:
        block.requires_grad_(False)
    return_layers = {str(index): str(level) for level, index in enumerate(MOBILENET_V2_STAGE_ENDS)}
    return BackboneWithFPN(features, return_layers, list(MOBILENET_V2_STAGE_CHANNELS), 256,
                           extra_blocks=LastLevelMaxPool())


def _body_target(backbone: BackboneWithFPN) -> tuple[str, Callable[[str], bool]]:
    """(prefix the ImageNet file puts before each body key, which file keys are the unused classifier)."""
    children = dict(backbone.body.named_children())
    if "layer1" in children:  # torchvision ResNet: the body holds conv1..layer4; avgpool/fc are the ImageNet head
        return "", lambda key: key.startswith("fc.")
    # MobileNetV2: the body is ``features[:18]``; the 1280-channel conv and the classifier only serve ImageNet
    last = str(len(children))
    return "features.", lambda key: key.startswith(("classifier.", f"features.{last}."))


def _frozen_bn_prefixes(module: nn.Module, prefix: str = "") -> set[str]:
    return {f"{prefix}{name}." if name else prefix for name, m in module.named_modules()
            if isinstance(m, FrozenBatchNorm2d)}


def _drop_frozen_bn_counters(sd: Mapping[str, Tensor], frozen: set[str]) -> OrderedDict[str, Tensor]:
    """``FrozenBatchNorm2d`` has no ``num_batches_tracked`` and discards the file's (torchvision/ops/misc.py)."""
    return OrderedDict((k, v) for k, v in sd.items()
                       if not (k.endswith(".num_batches_tracked") and k[: -len("num_batches_tracked")] in frozen))


def load_backbone_checkpoint(backbone: BackboneWithFPN, path: str | Path) -> None:
    """Load a torchvision ImageNet classifier file into ``backbone.body`` strictly: every body weight must be in the
    file with its shape; only the ImageNet head (ResNet ``fc``; MobileNetV2 ``classifier`` and the 1280-channel
    ``features.18``) may be extra. Anything else raises :class:`CheckpointError` naming the keys."""
    prefix, is_head = _body_target(backbone)
    body = backbone.body
    own, unexpected, sd = imagenet_backbone_state(path, prefix, is_head)
    own = _drop_frozen_bn_counters(own, _frozen_bn_prefixes(body))
    missing, extra, mismatched = compare_state_dicts(body.state_dict(), own)
    unexpected += [prefix + k for k in extra]
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith("backbone.body.") for k in sd):
            hint = ("The file is a whole detector: load it with kdzoo.models.detection.load_detection_checkpoint "
                    "(the teacher/student checkpoint), not as backbone_checkpoint.")
        body_name = "ResNet" if prefix == "" else "MobileNetV2"
        parts = [f"backbone checkpoint {path} does not fit this detector's {body_name} body (every body weight "
                 "must be in the file with its shape; only the ImageNet classifier may be extra).",
                 *mismatch_report(prefix, missing, unexpected, mismatched), hint]
        raise CheckpointError(" ".join(p for p in parts if p))
    body.load_state_dict(own, strict=True)


# --------------------------------------------------------------------------------------------------- whole detectors

# torchvision renamed these modules' convs when it wrapped them in ``Conv2dNormActivation`` (their ``_version = 2``);
# its ``_load_from_state_dict`` upgrades older files on the fly, and the published COCO files are such older files.
# kdzoo compares keys before loading, so the same renames are applied first (old suffix -> new suffix, per module).


def _legacy_renames(module: nn.Module) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if isinstance(module, FeaturePyramidNetwork):  # torchvision/ops/feature_pyramid_network.py
        for block in ("inner_blocks", "layer_blocks"):
            pairs += [(f"{block}.{i}.", f"{block}.{i}.0.") for i in range(len(module.inner_blocks))]
    elif isinstance(module, RPNHead):  # torchvision/models/detection/rpn.py
        pairs.append(("conv.", "conv.0.0."))
    elif isinstance(module, (RetinaNetClassificationHead, RetinaNetRegressionHead)):  # retinanet.py _v1_to_v2
        pairs += [(f"conv.{2 * i}.", f"conv.{i}.0.") for i in range(4)]
    return pairs


def upgrade_detection_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The file's keys as the current torchvision modules name them: torchvision's own legacy renames (FPN
    ``inner_blocks.i.weight`` -> ``inner_blocks.i.0.weight``, RPN head ``conv.weight`` -> ``conv.0.0.weight``, RetinaNet
    head ``conv.2k`` -> ``conv.k.0``) where the old key is in the file and not in the model, and the
    ``num_batches_tracked`` counters of FrozenBatchNorm2d modules dropped, as FrozenBatchNorm2d itself drops them."""
    model_keys = set(model.state_dict())
    renames: dict[str, str] = {}
    for name, module in model.named_modules():
        base = f"{name}." if name else ""
        for old, new in _legacy_renames(module):
            for kind in ("weight", "bias"):
                renames[f"{base}{old}{kind}"] = f"{base}{new}{kind}"
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in sd.items():
        new_key = renames.get(key)
        if new_key is not None and key not in model_keys and new_key in model_keys and new_key not in sd:
            key = new_key
        out[key] = value
    return _drop_frozen_bn_counters(out, _frozen_bn_prefixes(model))


def load_detection_checkpoint(model: nn.Module, path: str | Path, *, side: str = "student") -> dict[str, Any]:
    """Load a whole-detector file strictly (torchvision's COCO files such as
    ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, torchvision's ``references/detection`` checkpoints
    ``{"model": ...}``, kdzoo's own files); returns the file's metadata like
    :func:`kdzoo.models.checkpoint.load_checkpoint`, which it is, with the keys upgraded first
    (:func:`upgrade_detection_state_dict`, registered for every torchvision detector, so ``teacher.checkpoint`` loads
    the same files). Any missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming them (a
    different depth or class count is never half-loaded)."""
    try:
        return load_checkpoint(model, path, side=side)
    except CheckpointError as exc:
        if "cls_score.weight file" not in str(exc):
            raise
        raise CheckpointError(f"{exc} The box predictor's class count differs: build the model with the file's "
                              "num_classes (torchvision's COCO files: 91).") from exc


def _finish(model: nn.Module) -> nn.Module:
    model.tap_spec = detection_tap_spec(model)  # type: ignore[assignment]
    return model


@dataclass(frozen=True)
class TwoStageHeads:
    """The Faster R-CNN head sizes a constructor takes; the defaults are torchvision's and Detectron2's
    (``MODEL.FPN.OUT_CHANNELS`` 256, ``MODEL.ROI_BOX_HEAD.FC_DIM`` 1024, ``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE``
    512). Smaller ones make a detector a CPU can train in minutes (``kdzoo demo --task detection``)."""

    fpn_channels: int = 256
    box_representation_size: int = 1024
    box_batch_size_per_image: int = 512

    def __post_init__(self) -> None:
        for name in ("fpn_channels", "box_representation_size", "box_batch_size_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")


def _faster_rcnn(backbone: BackboneWithFPN, num_classes: int, min_size: MinSize, max_size: int,
                 backbone_checkpoint: str | None, heads: TwoStageHeads) -> FasterRCNN:
    if heads.fpn_channels != backbone.out_channels:  # same levels and blocks, narrower (Detectron2 FPN.OUT_CHANNELS)
        widths = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(widths, heads.fpn_channels, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = heads.fpn_channels
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(backbone, backbone_checkpoint)
    model = FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                       box_batch_size_per_image=heads.box_batch_size_per_image)
    if heads.box_representation_size != TwoStageHeads.box_representation_size:
        pooled = heads.fpn_channels * ROI_POOL_SIZE**2
        model.roi_heads.box_head = TwoMLPHead(pooled, heads.box_representation_size)
        model.roi_heads.box_predictor = FastRCNNPredictor(heads.box_representation_size, num_classes)
    return _finish(model)


def _resnet_faster_rcnn(depth: int, num_classes: int, min_size: MinSize, max_size: int, backbone_checkpoint: str | None,
                        trainable_backbone_layers: int, norm: str, heads: TwoStageHeads) -> FasterRCNN:
    _check_sizes(num_classes, min_size, max_size)
    backbone = _resnet_fpn(depth, _check_trainable(trainable_backbone_layers), one_stage=False, norm=norm)
    return _faster_rcnn(backbone, num_classes, min_size, max_size, backbone_checkpoint, heads)


@register_model("fasterrcnn_resnet18_fpn", family="detection", input_size=800)
def fasterrcnn_resnet18_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                            backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                            norm: str = "frozen_bn", fpn_channels: int = 256,
                            box_representation_size: int = 1024, box_batch_size_per_image: int = 512) -> FasterRCNN:
    """Faster R-CNN, ResNet-18 FPN (P2-P6), FrozenBN body: mdistiller's R-18 detection student."""
    return _resnet_faster_rcnn(18, num_classes, min_size, max_size, backbone_checkpoint, trainable_backbone_layers,
                               norm, TwoStageHeads(fpn_channels, box_representation_size, box_batch_size_per_image))


@register_model("fasterrcnn_resnet50_fpn", family="detection", input_size=800)
def fasterrcnn_resnet50_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                            backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                            norm: str = "frozen_bn", fpn_channels: int = 256,
                            box_representation_size: int = 1024, box_batch_size_per_image: int = 512) -> FasterRCNN:
    """Faster R-CNN, ResNet-50 FPN: torchvision's ``fasterrcnn_resnet50_fpn`` (its COCO file loads strictly)."""
    return _resnet_faster_rcnn(50, num_classes, min_size, max_size, backbone_checkpoint, trainable_backbone_layers,
                               norm, TwoStageHeads(fpn_channels, box_representation_size, box_batch_size_per_image))


@register_model("fasterrcnn_resnet101_fpn", family="detection", input_size=800)
def fasterrcnn_resnet101_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                             backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                             norm: str = "frozen_bn", fpn_channels: int = 256,
                             box_representation_size: int = 1024, box_batch_size_per_image: int = 512) -> FasterRCNN:
    """Faster R-CNN, ResNet-101 FPN: mdistiller's R-101 detection teacher."""
    return _resnet_faster_rcnn(101, num_classes, min_size, max_size, backbone_checkpoint, trainable_backbone_layers,
                               norm, TwoStageHeads(fpn_channels, box_representation_size, box_batch_size_per_image))


@register_model("fasterrcnn_mobilenet_v2_fpn", family="detection", input_size=800)
def fasterrcnn_mobilenet_v2_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                                backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                                norm: str = "frozen_bn", fpn_channels: int = 256,
                                box_representation_size: int = 1024, box_batch_size_per_image: int = 512) -> FasterRCNN:
    """Faster R-CNN, MobileNetV2 FPN on m2..m5 (strides 4-32) plus P6: mdistiller's MV2 detection student (which
    trains every block, ``trainable_backbone_layers=5``)."""
    _check_sizes(num_classes, min_size, max_size)
    backbone = _mobilenet_v2_fpn(_check_trainable(trainable_backbone_layers), norm)
    heads = TwoStageHeads(fpn_channels, box_representation_size, box_batch_size_per_image)
    return _faster_rcnn(backbone, num_classes, min_size, max_size, backbone_checkpoint, heads)


@register_model("retinanet_resnet50_fpn", family="detection", input_size=800)
def retinanet_resnet50_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                           backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                           norm: str = "frozen_bn") -> RetinaNet:
    """RetinaNet, ResNet-50 FPN (P3-P7): torchvision's ``retinanet_resnet50_fpn`` (v1)."""
    _check_sizes(num_classes, min_size, max_size)
    backbone = _resnet_fpn(50, _check_trainable(trainable_backbone_layers), one_stage=True, norm=norm)
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(backbone, backbone_checkpoint)
    return _finish(RetinaNet(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size))


@register_model("fcos_resnet50_fpn", family="detection", input_size=800)
def fcos_resnet50_fpn(num_classes: int = 91, min_size: MinSize = 800, max_size: int = 1333,
                      backbone_checkpoint: str | None = None, trainable_backbone_layers: int = 3,
                      norm: str = "frozen_bn") -> FCOS:
    """FCOS, ResNet-50 FPN (P3-P7): torchvision's ``fcos_resnet50_fpn``."""
    _check_sizes(num_classes, min_size, max_size)
    backbone = _resnet_fpn(50, _check_trainable(trainable_backbone_layers), one_stage=True, norm=norm)
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(backbone, backbone_checkpoint)
    return _finish(FCOS(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size))


for _detector_type in (FasterRCNN, RetinaNet, FCOS):
    register_state_dict_upgrade(_detector_type, upgrade_detection_state_dict)


# --------------------------------------------------------------------------------------------------- taps


def detection_tap_spec(model: nn.Module) -> TapSpec | None:
    """Hook taps of a torchvision Faster R-CNN / RetinaNet / FCOS on a ResNet or MobileNetV2 body.

    stem and stages: the body (ResNet ``relu``, ``layer1..4`` with their pre-ReLU inputs as for classification
    ResNets, docs/models.md; MobileNetV2 ``features.0`` and m2..m5, signed). Two-stage: ``pooled`` = the ROI box
    head's 1024-d output per sampled ROI, ``classifier`` = ``roi_heads.box_predictor.cls_score`` (so
    ``dense_logits`` = ROI class logits). One-stage: ``classifier`` = the classification head's last conv and
    ``pooled`` its (flattened) input at the first, finest level. FPN levels are not taps: the FPN returns a dict whose
    ``pool``/``p6``/``p7`` levels are built inside the extra block's tuple output; read them from
    :class:`kdzoo.models.detection.contract.DetectorOutputs` (``fpn``), which also carries everything a train-mode
    forward needs targets for. ``None`` for any other detector.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(model, (FasterRCNN, RetinaNet, FCOS)) or not isinstance(backbone, BackboneWithFPN):
        return None
    body = backbone.body
    children = dict(body.named_children())
    spec: dict[str, Any]
    layers = [f"layer{i}" for i in (1, 2, 3, 4)]
    if all(name in children for name in layers) and isinstance(children.get("relu"), nn.ReLU):
        pre_taps = torchvision_resnet_pre_taps(body, layers, "backbone.body.")
        if pre_taps is None:
            return None
        pre, bns = pre_taps
        spec = {"stem": Tap("backbone.body.relu"), "stages": tuple(Tap(f"backbone.body.{n}") for n in layers),
                "stages_pre": tuple(pre), "bn_before_relu": tuple(bns)}
    elif all(str(i) in children for i in MOBILENET_V2_STAGE_ENDS):
        spec = {"stem": Tap("backbone.body.0"),
                "stages": tuple(Tap(f"backbone.body.{i}") for i in MOBILENET_V2_STAGE_ENDS), "signed": True}
    else:
        return None
    if isinstance(model, FasterRCNN):
        spec |= {"pooled": Tap("roi_heads.box_head"), "classifier": "roi_heads.box_predictor.cls_score"}
    else:
        spec |= {"pooled": Tap("head.classification_head.cls_logits", point="input", transform="flatten"),
                 "classifier": "head.classification_head.cls_logits"}
    return safe_inplace(TapSpec(**spec), model)


@register_tap_resolver
def _resolve_detection_taps(model: nn.Module) -> TapSpec | None:
    # ``torchvision:fasterrcnn_resnet50_fpn`` and friends (built by kdzoo.models.foreign) get the same taps.
    return detection_tap_spec(model)


__all__ = [
    "MOBILENET_V2_STAGE_ENDS",
    "detection_tap_spec",
    "fasterrcnn_mobilenet_v2_fpn",
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet101_fpn",
    "fcos_resnet50_fpn",
    "load_backbone_checkpoint",
    "load_detection_checkpoint",
    "retinanet_resnet50_fpn",
    "upgrade_detection_state_dict",
]

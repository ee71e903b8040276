"""torchvision's segmentation models (``torchvision:deeplabv3_resnet50``, ``fcn_resnet50``,
``lraspp_mobilenet_v3_large`` ...) under kdzoo's contract: ``forward(x)`` returns the ``out`` tensor, and a tap spec.

torchvision's ``forward`` returns ``{"out": ..., "aux": ...}``. The built instance's class is switched to a subclass
whose only change is ``forward`` returning ``out``: the instance stays torchvision's, so state_dict keys and module
paths are exactly torchvision's (torchvision checkpoints load, taps name torchvision paths) and no wrapper prefix
appears. ``aux`` (only with ``aux_loss=True``) is not returned.

Taps: the backbone body through the ``IntermediateLayerGetter`` children (ResNet: stem ``backbone.relu``, stages
``backbone.layer1..4`` with their pre-ReLU inputs as for classification ResNets, docs/models.md; MobileNetV3: the
last block before each stride-2 block, and the last one, signed), classifier = the head's last conv (LRASPP: the
head itself, whose output is the sum of its two classifier convs), so the ``dense_logits`` tap is the class-score
map before the upsampling.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchvision.models.mobilenetv3 import InvertedResidual as MobileNetV3Block
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import ASPP

from kdzoo.models.foreign import register_foreign_adapter, safe_inplace, torchvision_resnet_pre_taps
from kdzoo.models.taps import Tap, TapSpec


class _OutTensor:
    """Mixin: the ``out`` entry of torchvision's dict output."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)["out"]  # type: ignore[misc]


class DeepLabV3Out(_OutTensor, DeepLabV3):
    pass


class FCNOut(_OutTensor, FCN):
    pass


class LRASPPOut(_OutTensor, LRASPP):
    pass


_OUT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {DeepLabV3: DeepLabV3Out, FCN: FCNOut, LRASPP: LRASPPOut}


def _resnet_body(body: nn.Module) -> dict[str, Any] | None:
    layers = [f"layer{i}" for i in (1, 2, 3, 4)]
    children = dict(body.named_children())
    if not all(name in children for name in layers):
        return None
    pre_taps = torchvision_resnet_pre_taps(body, layers, "backbone.")
    if pre_taps is None:
        return None
    pre, bns = pre_taps
    return {
        "stem": Tap("backbone.relu"),
        "stages": tuple(Tap(f"backbone.{name}") for name in layers),
        "stages_pre": tuple(pre),
        "bn_before_relu": tuple(bns),
    }


def _mobilenetv3_body(body: nn.Module) -> dict[str, Any] | None:
    blocks = list(body.named_children())
    if len(blocks) < 3 or not any(isinstance(b, MobileNetV3Block) for _, b in blocks):
        return None
    # torchvision's own stage split (segmentation/deeplabv3.py, lraspp.py): blocks flagged ``_is_cn`` start a stage.
    starts = [i for i, (_, b) in enumerate(blocks) if getattr(b, "_is_cn", False)]
    ends = [i - 1 for i in starts if i > 1] + [len(blocks) - 1]
    return {
        "stem": Tap(f"backbone.{blocks[0][0]}"),
        "stages": tuple(Tap(f"backbone.{blocks[i][0]}") for i in ends),
        "signed": True,  # linear-bottleneck block outputs
    }


def _head(model: nn.Module) -> dict[str, Any] | None:
    head = model.classifier
    if isinstance(model, LRASPP):
        # The head's output is low_classifier(low) + high_classifier(x): no single conv produces the scores.
        return {"classifier": "classifier", "pooled": Tap("classifier.scale.0", transform="flatten")}
    if not isinstance(head, nn.Sequential) or not isinstance(head[-1], nn.Conv2d):
        return None
    spec: dict[str, Any] = {"classifier": f"classifier.{len(head) - 1}"}
    if isinstance(head[0], ASPP):  # DeepLabHead: the image-level branch pools the backbone output
        pool = f"classifier.0.convs.{len(head[0].convs) - 1}.0"
        spec |= {"pooled": Tap(pool, transform="flatten"), "prepool": Tap(pool, point="input")}
    else:  # FCNHead has no global pooling: the classifier's input, as the config default
        spec["pooled"] = Tap(spec["classifier"], point="input", transform="flatten")
    return spec


def segmentation_tap_spec(model: nn.Module) -> TapSpec | None:
    """Taps of a torchvision DeepLabV3 / FCN / LRASPP; ``None`` for a backbone or head it does not know."""
    if not isinstance(model, (DeepLabV3, FCN, LRASPP)):
        return None
    body = _resnet_body(model.backbone) or _mobilenetv3_body(model.backbone)
    head = _head(model)
    if body is None or head is None:
        return None
    return safe_inplace(TapSpec(**body, **head), model)


@register_foreign_adapter
def adapt_segmentation_model(model: nn.Module) -> nn.Module | None:
    out_class = _OUT_CLASSES.get(type(model))
    if out_class is None:
        return None
    model.__class__ = out_class  # same instance and attributes: only forward changes
    spec = segmentation_tap_spec(model)
    if spec is not None:
        model.tap_spec = spec  # type: ignore[assignment]
    return model

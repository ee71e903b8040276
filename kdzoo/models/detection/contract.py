"""The detector contract kdzoo's distillation methods rely on.

A detector is a torchvision ``GeneralizedRCNN`` (Faster R-CNN), ``RetinaNet`` or ``FCOS`` with a ``BackboneWithFPN``:

* training forward: ``model(images, targets)`` with ``images: list[Tensor[3, H, W]]`` in [0, 1] and ``targets:
  list[{"boxes": float Tensor[N, 4] (x1, y1, x2, y2, pixels), "labels": int64 Tensor[N]}]`` returns torchvision's loss
  dict (Faster R-CNN: ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``; RetinaNet:
  ``classification``, ``bbox_regression``; FCOS: plus ``bbox_ctrness``); eval forward ``model(images)`` returns
  torchvision's detections (``boxes``, ``labels``, ``scores`` per image, in input-image pixels).
* :func:`detector_forward_with_taps` is that training forward, step by step through the model's own modules
  (``transform``, ``backbone.body``, ``backbone.fpn``, ``rpn``, ``roi_heads.select_training_samples``,
  ``box_roi_pool``, ``box_head``, ``box_predictor``, torchvision's ``fastrcnn_loss``), returning the same losses and the
  intermediate values: every module runs once, so no BatchNorm statistic moves twice and one RNG state gives the
  same sampled proposals and the same loss dict as ``model(images, targets)``.
* :func:`teacher_forward_with_taps` runs a teacher in eval mode without gradients: its own transform (own resize
  and normalisation) on the same raw images, its body and FPN and, given the student's sampled proposals, its
  ``box_roi_pool`` + ``box_head`` + ``box_predictor`` on exactly those proposals (rescaled from the student's
  transformed image size to the teacher's), so both ROI heads classify the same boxes.

That last step is what megvii-research/mdistiller ``detection/model/rcnn.py`` (``RCNNKD.forward``) does for DKD: the
student's ``roi_heads`` sample proposals (Detectron2's ``label_and_sample_proposals``: 512 per image, 25 % foreground,
ground-truth boxes appended, as torchvision's ``select_training_samples``), then ``forward_pure_roi_head`` runs the
student's and the teacher's box pooler + box head + predictor on those same proposals, and the DKD loss compares the
two class-logit sets with the proposals' assigned classes as targets. Its ReviewKD distils the five FPN levels
(``p2..p6``). Detectron2 resizes in the data loader, so there both see one image size; torchvision resizes inside the
model, hence the rescaling here (none when both transforms resize alike).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.transform import resize_boxes

from kdzoo.errors import UserInputError

Target = dict[str, Tensor]


@dataclass
class DetectorOutputs:
    """One detector forward, opened up.

    ``images``: the transformed batch (``images.tensors`` [B, 3, H, W] resized, normalised and zero-padded to a
    multiple of 32; ``images.image_sizes`` the unpadded (h, w) of each). ``targets``: the targets resized with it.
    ``stages``: the backbone body's maps that feed the FPN (ResNet Faster R-CNN: layer1..4 as ``'0'..'3'``; RetinaNet /
    FCOS: layer2..4; MobileNetV2: m2..m5). ``fpn``: the FPN levels (``'0'..'3', 'pool'``, or ``'0'..'2', 'p6', 'p7'``).
    Two-stage only (else ``None``): ``proposals`` = the sampled proposals per image in transformed-image pixels,
    ground-truth boxes included; ``proposal_labels`` = the class each was assigned (0 = background);
    ``regression_targets`` = their encoded box targets; ``class_logits`` [sum of sampled, num_classes] and
    ``box_regression`` [sum of sampled, num_classes * 4] = the ROI head's outputs for them (the tensors the losses
    were computed from). One-stage only: ``head_outputs`` = the head's dict (``cls_logits`` [B, anchors, classes],
    ``bbox_regression`` ...). ``losses`` is empty for a teacher forward.
    """

    images: ImageList
    stages: OrderedDict[str, Tensor]
    fpn: OrderedDict[str, Tensor]
    losses: dict[str, Tensor] = field(default_factory=dict)
    targets: list[Target] | None = None
    proposals: list[Tensor] | None = None
    proposal_labels: list[Tensor] | None = None
    regression_targets: list[Tensor] | None = None
    class_logits: Tensor | None = None
    box_regression: Tensor | None = None
    head_outputs: dict[str, Tensor] | None = None


def _check_detector(model: nn.Module, role: str) -> None:
    if not isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS)):
        raise UserInputError(f"the {role} is a {type(model).__name__}, not a torchvision Faster R-CNN, RetinaNet or "
                             "FCOS detector (kdzoo's detection contract, kdzoo/models/detection/contract.py)")
    if isinstance(model, GeneralizedRCNN) and model.roi_heads.has_mask():
        raise UserInputError(f"the {role} has a mask head: kdzoo's detection contract covers box detectors only")


def _check_targets(images: Sequence[Tensor], targets: Sequence[Target] | None) -> None:
    """torchvision's own checks (generalized_rcnn.py, roi_heads.py), as UserInputErrors naming the image."""
    if targets is None:
        raise UserInputError("a training forward needs targets (one dict with 'boxes' and 'labels' per image)")
    if len(targets) != len(images):
        raise UserInputError(f"{len(images)} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise UserInputError(f"target {i}: 'boxes' must be a float tensor of shape [N, 4], got {shape}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise UserInputError(f"target {i}: 'labels' must be an int64 tensor of shape [{boxes.shape[0]}]")


def _check_degenerate(targets: Sequence[Target]) -> None:
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            box = boxes[int(torch.where(bad)[0][0])].tolist()
            raise UserInputError(f"target {i}: every box needs positive width and height after resizing; found {box}")


def _body_and_fpn(backbone: nn.Module, x: Tensor) -> tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]:
    if isinstance(backbone, BackboneWithFPN):
        stages = backbone.body(x)
        return stages, backbone.fpn(stages)
    features = backbone(x)  # another backbone: its levels only
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return OrderedDict(), features


def detector_forward_with_taps(model: nn.Module, images: Sequence[Tensor],
                               targets: Sequence[Target]) -> DetectorOutputs:
    """The training forward of ``model`` (train mode) with everything a distiller reads; ``losses`` equals
    ``model(images, targets)`` under the same RNG state."""
    _check_detector(model, "student")
    if not model.training:
        raise ValueError("detector_forward_with_taps is the training forward: call model.train() first")
    images = list(images)
    _check_targets(images, targets)
    batch, resized = model.transform(images, [dict(t) for t in targets])
    assert resized is not None
    _check_degenerate(resized)
    stages, fpn = _body_and_fpn(model.backbone, batch.tensors)
    out = DetectorOutputs(images=batch, stages=stages, fpn=fpn, targets=resized)
    if isinstance(model, GeneralizedRCNN):
        proposals, rpn_losses = model.rpn(batch, fpn, resized)
        heads = model.roi_heads
        sampled, _matched, labels, regression_targets = heads.select_training_samples(proposals, resized)
        box_features = heads.box_head(heads.box_roi_pool(fpn, sampled, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        # torchvision's order: the ROI losses, then the RPN's (generalized_rcnn.py)
        out.losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **rpn_losses}
        out.proposals, out.proposal_labels, out.regression_targets = sampled, labels, regression_targets
        out.class_logits, out.box_regression = class_logits, box_regression
    else:
        levels = list(fpn.values())
        head_outputs = model.head(levels)
        anchors = model.anchor_generator(batch, levels)
        if isinstance(model, FCOS):
            per_level = [x.size(2) * x.size(3) for x in levels]
            out.losses = model.compute_loss(resized, head_outputs, anchors, per_level)
        else:
            out.losses = model.compute_loss(resized, head_outputs, anchors)
        out.head_outputs = head_outputs
    return out


def rescale_proposals(proposals: Sequence[Tensor], from_sizes: Sequence[tuple[int, int]],
                      to_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Boxes in one transform's image frame -> another's (per-axis size ratios, as torchvision's postprocess maps
    detections back to the input image)."""
    if not len(proposals) == len(from_sizes) == len(to_sizes):
        raise ValueError(f"{len(proposals)} proposal sets for {len(from_sizes)} / {len(to_sizes)} image sizes")
    return [p if tuple(src) == tuple(dst) else resize_boxes(p, list(src), list(dst))
            for p, src, dst in zip(proposals, from_sizes, to_sizes)]


@torch.no_grad()
def teacher_forward_with_taps(teacher: nn.Module, images: Sequence[Tensor], proposals: Sequence[Tensor] | None = None,
                              image_sizes: Sequence[tuple[int, int]] | None = None) -> DetectorOutputs:
    """The teacher's view of the raw ``images`` (eval mode, no gradients): its transform, body and FPN, and with
    ``proposals`` (the student's sampled proposals, in the student's transformed frame whose unpadded sizes are
    ``image_sizes``) its ROI class logits and box regression for exactly those boxes, in that order."""
    _check_detector(teacher, "teacher")
    if teacher.training:
        raise ValueError("the teacher must be in eval mode (teacher.eval()): its transform would pick a random "
                         "training size")
    batch, _ = teacher.transform(list(images))
    stages, fpn = _body_and_fpn(teacher.backbone, batch.tensors)
    out = DetectorOutputs(images=batch, stages=stages, fpn=fpn)
    if proposals is None:
        return out
    if not isinstance(teacher, GeneralizedRCNN):
        raise UserInputError(f"teacher {type(teacher).__name__} has no ROI head to classify the student's proposals "
                             "(ROI logit distillation needs a two-stage teacher)")
    if image_sizes is None:
        raise ValueError("image_sizes (the student's transformed image sizes) are needed to place its proposals")
    boxes = rescale_proposals(proposals, image_sizes, batch.image_sizes)
    heads = teacher.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(fpn, boxes, batch.image_sizes))
    out.class_logits, out.box_regression = heads.box_predictor(box_features)
    out.proposals = boxes
    return out


def roi_logits_for(teacher: nn.Module, images: Sequence[Tensor], proposals: Sequence[Tensor],
                   image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """The teacher's ROI class logits [sum of proposals, teacher classes] for the student's proposals."""
    logits = teacher_forward_with_taps(teacher, images, proposals, image_sizes).class_logits
    assert logits is not None
    return logits


__all__ = [
    "DetectorOutputs",
    "detector_forward_with_taps",
    "rescale_proposals",
    "roi_logits_for",
    "teacher_forward_with_taps",
]

"""Object-detection models: torchvision's Faster R-CNN (ResNet-18/50/101, MobileNetV2 FPN), RetinaNet and FCOS, and
the detector contract distillation methods use (:mod:`kdzoo.models.detection.contract`)."""

from kdzoo.models.detection.contract import (
    DetectorOutputs,
    detector_forward_with_taps,
    rescale_proposals,
    roi_logits_for,
    teacher_forward_with_taps,
)
from kdzoo.models.detection.zoo import (
    detection_tap_spec,
    load_backbone_checkpoint,
    load_detection_checkpoint,
    upgrade_detection_state_dict,
)

__all__ = [
    "DetectorOutputs",
    "detection_tap_spec",
    "detector_forward_with_taps",
    "load_backbone_checkpoint",
    "load_detection_checkpoint",
    "rescale_proposals",
    "roi_logits_for",
    "teacher_forward_with_taps",
    "upgrade_detection_state_dict",
]

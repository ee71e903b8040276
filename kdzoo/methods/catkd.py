"""CAT-KD — Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023, arXiv 2304.12777
(docs/methods/catkd.md). Reference: GzyAftermath/CAT-KD
``mdistiller/distillers/CAT_KD.py`` (``CAT_loss``) with the model conversion it trains with
(``tools/train.py`` ``if_test``; ``models/cifar/*_test``).

A class activation map is the classifier applied as a 1x1 convolution to the map F that global pooling
reduces to the embedding: CAM_k = w_k . F, one map per class, no bias. Teacher and student CAMs are
average-pooled to r x r and matched with MSE (optionally L2-normalised per map first); the student also
trains with cross-entropy.

The reference's converted models carry no classifier bias: the teacher's fc weight becomes the 1x1 conv
(its bias is dropped), and the student is built bias-free, so its logits are exactly the spatial mean of
its CAMs. Here the student keeps its own architecture, so its export loads as the plain model, with the
classifier bias fixed at zero: the same function. The teacher is left as it is (only its classifier
weight enters the CAMs). Pooling and the 1x1 convolution are both linear and commute, so the maps are
pooled first and the classifier applied to K x r x r values instead of K x H x W (same values up to fp32
summation order). Only the CAT-KD configuration is implemented; the reference's ablations (binarised
teacher CAMs, transferring a subset of classes) are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller, find_classifier
from kdzoo.methods.losses import at_least_fp32, autocast_off
from kdzoo.methods.registry import register_method
from kdzoo.models.taps import Outputs, features
from kdzoo.types import Batch, Progress


@dataclass
class CATKDConfig:
    cat_weight: float = 15.0  # CAT-KD configs/cifar100/CAT_KD/res32x4_res8x4.yaml CAT_KD.LOSS.CAT_loss_weight (beta)
    cam_resolution: int = 2  # same file, CAT_KD.LOSS.CAM_RESOLUTION
    normalize: bool = False  # same file, CAT_KD.IF_NORMALIZE (True: unit L2 norm per pooled map)
    ce_weight: float = 1.0  # same file, CAT_KD.LOSS.CE_WEIGHT
    kd_weight: float = 0.0  # CAT-KD adds no KD term (onlyCAT False means CE + CAT)
    temperature: float = 4.0  # KD temperature, used only when kd_weight > 0


def pooled_class_maps(feature_map: Tensor, classifier_weight: Tensor, resolution: int) -> Tensor:
    """``adaptive_avg_pool2d(conv1x1(feature_map, W), r)`` as ``conv1x1(adaptive_avg_pool2d(feature_map, r), W)``:
    [B, C, H, W] and [K, C] -> [B, K, r, r], in fp32."""
    pooled = F.adaptive_avg_pool2d(at_least_fp32(feature_map), resolution)
    weight = at_least_fp32(classifier_weight)
    return F.conv2d(pooled, weight.reshape(*weight.shape, 1, 1))


def cat_loss(student_maps: Tensor, teacher_maps: Tensor, normalize: bool) -> Tensor:
    """MSE between pooled CAMs [B, K, r, r] (the reference's ``CAT_loss`` after its pooling)."""
    if normalize:
        student_maps, teacher_maps = F.normalize(student_maps, dim=(2, 3)), F.normalize(teacher_maps, dim=(2, 3))
    return F.mse_loss(student_maps, teacher_maps)


def linear_classifier(model: nn.Module, role: str) -> nn.Linear:
    head = find_classifier(model, f"catkd applies the {role}'s classifier to its feature map")
    if isinstance(head, nn.Sequential):  # RepDistiller's MobileNetV2: Sequential(Linear); timm/tv: Dropout first
        layers = list(head)
        if layers and all(isinstance(m, (nn.Dropout, nn.Identity)) for m in layers[:-1]):
            head = layers[-1]
    if not isinstance(head, nn.Linear):
        raise UserInputError(f"catkd needs a linear classifier on the {role} ({type(model).__name__} has "
                             f"{type(head).__name__})")
    return head


def _check_prepool_tap(model: nn.Module, input_shape: tuple[int, ...], role: str) -> None:
    """The CAMs are only class attention if the tapped map is what global pooling reduces to the embedding."""
    was_training = model.training
    model.eval()
    try:
        # A random batch, not probe_shapes' zeros: through a fresh network zeros can stay zero on both sides
        # of the comparison and let a wrong tap pass.
        with torch.no_grad():
            probe = features(model, torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(
                next(model.parameters()).device), ("pooled", "prepool"))
    finally:
        model.train(was_training)
    assert probe.prepool is not None and probe.pooled is not None
    if probe.prepool.dim() != 4 or not torch.allclose(probe.prepool.mean((2, 3)), probe.pooled.flatten(1),
                                                      rtol=1e-4, atol=1e-4):
        raise UserInputError(
            f"catkd needs the {role}'s feature map right before global average pooling; the taps of "
            f"{type(model).__name__} do not give it (declare TapSpec.prepool for this architecture)"
        )


@register_method("catkd")
class CATKD(Distiller):
    Config = CATKDConfig
    teacher_taps = ("prepool",)
    student_taps = ("prepool",)

    def build(self) -> None:
        assert self.teacher is not None
        if self.cfg.cam_resolution < 1:
            raise UserInputError(f"catkd cam_resolution must be >= 1, got {self.cfg.cam_resolution}")
        student_head = linear_classifier(self.student, "student")
        teacher_head = linear_classifier(self.teacher, "teacher")
        if student_head.out_features != teacher_head.out_features:
            raise UserInputError(f"catkd matches one CAM per class: the student has {student_head.out_features} "
                                 f"classes, the teacher {teacher_head.out_features}")
        for model, role in ((self.student, "student"), (self.teacher, "teacher")):
            _check_prepool_tap(model, tuple(self.input_shape), role)
        if student_head.bias is not None:  # the reference's student has none: logits = mean of its CAMs
            with torch.no_grad():
                student_head.bias.zero_()
            student_head.bias.requires_grad_(False)
        # Kept out of the module tree: they belong to the networks (and are checkpointed with them).
        object.__setattr__(self, "_student_head", student_head)
        object.__setattr__(self, "_teacher_head", teacher_head)

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        assert teacher is not None and student.prepool is not None and teacher.prepool is not None
        cfg = self.cfg
        losses = self.ce_and_kd(student.logits, teacher.logits, batch.target)
        with autocast_off(student.prepool):
            student_maps = pooled_class_maps(student.prepool, self._student_head.weight, cfg.cam_resolution)
            teacher_maps = pooled_class_maps(teacher.prepool, self._teacher_head.weight, cfg.cam_resolution)
            losses["loss_cat"] = cfg.cat_weight * cat_loss(student_maps, teacher_maps, cfg.normalize)
        return losses

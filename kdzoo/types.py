"""The value types every layer shares: what a batch carries, where training is, what a stage trains.

A leaf module (it imports only torch), so the data pipeline, the methods and the engine can all use
these types without importing one another. ``docs/design.md`` shows how a batch flows through them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

MAIN_STAGE = "main"
"""The name of the stage every method has: the distillation run itself (``docs/design.md``, Stages)."""

INIT_STAGE = "init"
"""AB, FT and FSP's initialisation stage before the main one (RepDistiller ``helper/pretrain.py``); OFD's
connector-only first epoch on segmentation (overhaul-distillation ``Segmentation/train_with_distillation.py``)."""

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
DETECTION = "detection"
TASKS = (CLASSIFICATION, SEGMENTATION, DETECTION)
"""The tasks a run can train for (the config's ``task``); a method declares which it supports."""


@dataclass(frozen=True)
class TaskSpec:
    """What a method must know about the task to score the student's own output (``docs/design.md``, Tasks).

    Classification: cross-entropy of ``[B, K]`` logits against ``[B]`` labels. Segmentation: per-pixel
    cross-entropy of ``[B, K, H, W]`` logits against ``[B, H, W]`` labels, pixels labelled ``ignore_index``
    excluded; ``ce_batch_average`` divides that mean once more by the batch size, as pytorch-deeplab-xception's
    ``SegmentationLosses(batch_average=True)`` does in the overhaul-distillation segmentation recipes."""

    name: str = CLASSIFICATION
    ignore_index: int = 255
    ce_batch_average: bool = False


@dataclass
class Batch:
    """One batch, as the data pipeline delivers it and a method reads it.

    ``index``: dataset indices of the samples (CRD's memory-bank keys, the teacher cache's keys).
    ``crop``: [B, 3] int64 (crop_x, crop_y, flip) of the in-memory pipeline's random crop, which, with
    ``index``, identifies the exact augmented view (the teacher cache is keyed by it).
    ``teacher_logits``: the teacher's logits for this very view, read from the teacher cache; a
    logits-only method then skips the teacher forward.
    ``contrast_index``: [B, K+1] CRD negatives chosen by the caller (column 0 = the positive); when
    absent CRD draws them itself (mdistiller passes them as ``contrastive_index``, RepDistiller's loop
    as ``contrast_idx``; :meth:`kdzoo.methods.base.Distiller.forward_train` accepts all three names).
    ``strong_image``: a second, strongly augmented view of the same samples (its own crop/flip, then RandAugment
    and Cutout: ``kdzoo/data/strong_augment.py``), delivered when the method declares ``needs_strong_view``
    (MLKD, docs/methods/mlkd.md).
    """

    image: Tensor
    target: Tensor
    index: Tensor | None = None
    crop: Tensor | None = None
    teacher_logits: Tensor | None = None
    contrast_index: Tensor | None = None
    strong_image: Tensor | None = None


@dataclass
class Progress:
    """Where training is. ``epoch`` is 1-based (mdistiller's warm-up convention, ``docs/methods/dkd.md``)."""

    epoch: int = 1
    epochs: int = 240
    step: int = 0  # global optimisation step, 0-based
    stage: str = MAIN_STAGE


@dataclass
class DatasetInfo:
    """What a method may need to know about the training set before training (CRD: N, labels)."""

    num_samples: int
    num_classes: int
    targets: Tensor  # int64 [N], on CPU


@dataclass
class Stage:
    """One training stage. AB/FT/FSP first train only some modules on the method loss (RepDistiller's
    30-epoch init), then run the main stage.

    ``trainable`` names parameter sets of the distiller: ``student``, ``extra`` (every extra module), a
    module attribute such as ``connectors``, or a set the method defines (FitNet's ``hint_trunk``).
    ``epochs=None`` means the schedule's epochs; ``lr`` overrides the optimiser's lr for the stage;
    ``use_schedule`` says whether the main lr schedule applies; ``scale_groups=False`` runs every parameter
    group at the base lr, ignoring ``optim.head_lr_scale`` / ``optim.extra_lr_scale`` (OFD's segmentation
    init epoch: pytorch-deeplab-xception's ``LR_Scheduler`` gives a one-group optimiser the base lr)."""

    name: str = MAIN_STAGE
    epochs: int | None = None
    trainable: tuple[str, ...] = ("student", "extra")
    lr: float | None = None
    use_schedule: bool = True
    scale_groups: bool = True


@dataclass
class StageOverride:
    """``method.stages: [{name: init, epochs: 10, lr: 0.01}, ...]`` in a config: changes a stage the
    method declares. Every field set here takes effect; which losses a stage computes stays the method's."""

    name: str = MAIN_STAGE
    epochs: int | None = None
    trainable: list[str] | None = None
    lr: float | None = None
    use_schedule: bool | None = None

"""The method interface: a ``Distiller`` owns teacher, student and its extra modules and turns one
batch into named, already-weighted losses. The trainer only sums, steps, logs and checkpoints.

The public contract is mdistiller's (``forward_train(image=, target=, epoch=, **extras) ->
(student_logits, {name: loss})`` and ``forward_test(image)``), so its users can port methods. A
method file subclasses :class:`Distiller`, sets class attributes that *declare* what it needs
(taps, sample indices, teacher mode, stages) and implements :meth:`compute_losses`. Everything the
trainer must treat differently per method is one of these declarations, never a name check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdzoo.errors import UserInputError
from kdzoo.methods.losses import ce_and_kd, cross_entropy
from kdzoo.models.detection import detector_forward_with_taps, teacher_forward_with_taps
from kdzoo.models.taps import FeatureExtractor, Outputs, TapGroup, classifier_of, probe_shapes
from kdzoo.types import (
    CLASSIFICATION,
    DETECTION,
    MAIN_STAGE,
    TASKS,
    Batch,
    DatasetInfo,
    Progress,
    Stage,
    StageOverride,
    TaskSpec,
)
from kdzoo.validation import merge_into_schema


def find_classifier(model: nn.Module, purpose: str) -> nn.Module:
    """``classifier_of(model)``, or a UserInputError that says what the method needed it for."""
    try:
        return classifier_of(model)
    except Exception as exc:  # any failure to locate it means the method cannot run with this model
        raise UserInputError(f"{purpose}, but none was found on {type(model).__name__}: {exc}") from exc


def check_task_supported(method: type[Distiller], task: str) -> None:
    """UserInputError unless ``method`` declares ``task`` (checked when the config is read and at construction)."""
    if task not in TASKS:
        raise UserInputError(f"unknown task {task!r}; kdzoo trains {', '.join(TASKS)}")
    if task not in method.supported_tasks:
        raise UserInputError(
            f"method {method.name!r} is defined for {', '.join(method.supported_tasks)}, not {task} "
            "(`kdzoo list methods` shows each method's tasks)"
        )


# CRD's negatives under the names mdistiller's and RepDistiller's training loops pass them.
CONTRAST_INDEX_ALIASES = ("contrastive_index", "contrast_idx")


class Distiller(nn.Module):
    """Base class of every method (including the teacher-free cross-entropy baseline)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # Which tap groups each side needs; empty = logits only (cheapest, teacher-cache friendly).
    teacher_taps: ClassVar[tuple[TapGroup, ...]] = ()
    student_taps: ClassVar[tuple[TapGroup, ...]] = ()
    requires_teacher: ClassVar[bool] = True
    # OFD runs the teacher in train mode (batch statistics), as the official code does.
    teacher_train_mode: ClassVar[bool] = False
    # SemCKD needs every batch to have the same size (its modules are sized by the batch: ``batch_size``).
    needs_fixed_batch_size: ClassVar[bool] = False
    # MLKD also trains on a strongly augmented view of each batch (``Batch.strong_image``, RandAugment + Cutout):
    # the data pipeline then delivers one (kdzoo/data/strong_augment.py).
    needs_strong_view: ClassVar[bool] = False
    # SimKD never uses the student's own head: DDP must be told some parameters get no gradient.
    leaves_parameters_unused: ClassVar[bool] = False
    # Buffers the method itself keeps identical on every process (CRD's memory banks, updated from an
    # all-gather): DDP does not re-broadcast them from rank 0 before every forward (51 MB a step for
    # CIFAR-100's banks); the trainer syncs them once at the start and checks them every epoch.
    self_synchronised_buffers: ClassVar[tuple[str, ...]] = ()
    # The loss terms that are the task's own loss (the student's cross-entropy); every other term is
    # distillation. DOT steps the two with different momenta (docs/methods/dot.md).
    task_losses: ClassVar[tuple[str, ...]] = ("loss_ce",)
    # Every stage name :meth:`stages` may return, in training order; ``method.stages`` overrides may name
    # only these (checked when the config is read, before anything is built).
    declared_stages: ClassVar[tuple[str, ...]] = (MAIN_STAGE,)
    # Names a stage's ``trainable`` may use beyond ``student``, ``extra`` and the extra modules: module
    # attributes that are not children (AB/FSP's ``student_body`` view) or sets the method computes
    # (FitNet's ``hint_trunk``, resolved by its :meth:`parameter_set`).
    parameter_sets: ClassVar[tuple[str, ...]] = ()
    # The tasks the method is defined for (docs/design.md, Tasks): using it on another task is a config error.
    supported_tasks: ClassVar[tuple[str, ...]] = (CLASSIFICATION,)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        cfg: Any = None,
        *,
        input_shape: Sequence[int] = (3, 32, 32),
        batch_size: int | None = None,
        task: TaskSpec | None = None,
        **hparams: Any,
    ):
        """``input_shape``: one sample's shape (the dry runs that size extra modules use it).
        ``batch_size``: the per-process training batch, for methods whose modules are sized by it (SemCKD);
        the trainer passes ``data.batch_size``. ``task``: the task and how its own loss is computed
        (classification by default)."""
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise UserInputError(f"method {self.name!r} needs a teacher; none was given")
        self.task = task or TaskSpec()
        check_task_supported(type(self), self.task.name)
        self.cfg = build_method_config(type(self), cfg, hparams)
        self.stage_overrides = stage_overrides(cfg, hparams)
        self.input_shape = tuple(input_shape)
        self.batch_size = batch_size
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.train(self.teacher_train_mode)
        self.student_extractor = FeatureExtractor(student, self.student_taps)
        self.teacher_extractor = FeatureExtractor(teacher, self.teacher_taps) if teacher is not None else None
        self.build()
        self._training_stages = self._resolve_stages()

    # ---- hooks a method overrides -------------------------------------------------------------
    def build(self) -> None:
        """Create extra trainable modules (use :meth:`probe_student` / :meth:`probe_teacher` for shapes)."""

    def compute_losses(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, progress: Progress
    ) -> dict[str, Tensor]:
        """Named, weighted loss terms; their sum is what the trainer minimises."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        """Training stages in order; most methods have just the main one."""
        return [Stage()]

    def training_stages(self) -> list[Stage]:
        """:meth:`stages` with the config's ``method.stages`` overrides applied: what the trainer runs."""
        return list(self._training_stages)

    def _resolve_stages(self) -> list[Stage]:
        """Apply the overrides and check every stage now, at construction (before a run directory exists):
        each stage is declared, each override names a stage the method runs, each ``trainable`` entry
        names a parameter set, and every stage trains something."""
        stages = self.stages()
        undeclared = [s.name for s in stages if s.name not in self.declared_stages]
        if undeclared:
            raise TypeError(f"{type(self).__name__}.stages() returns {undeclared}, missing from declared_stages")
        by_name = {s.name: s for s in stages}
        for override in self.stage_overrides:
            if override.name not in by_name:
                raise UserInputError(
                    f"method.stages names stage {override.name!r}, but {self.name} runs the stages {list(by_name)} "
                    "with this config"
                )
            changes = {k: v for k, v in dataclasses.asdict(override).items() if k != "name" and v is not None}
            if "trainable" in changes:
                changes["trainable"] = tuple(changes["trainable"])
            by_name[override.name] = dataclasses.replace(by_name[override.name], **changes)
        resolved = [by_name[s.name] for s in stages]
        for stage in resolved:
            if stage.epochs is not None and stage.epochs < 1:
                raise UserInputError(f"method.stages: stage {stage.name!r} of {self.name} needs epochs >= 1")
            if not any(True for _ in self.trainable_parameters(stage)):
                raise UserInputError(f"stage {stage.name!r} of {self.name} has no trainable parameters")
        return resolved

    def bind_dataset(self, info: DatasetInfo) -> None:
        """Called once before training with facts about the training set (default: nothing)."""

    def export_student(self) -> nn.Module:
        """The network deployed after training (SimKD overrides: backbone + projector + teacher fc)."""
        return self.student

    @property
    def exports_composite(self) -> bool:
        """True when the deployed network is more than the student architecture (SimKD): the export then
        records how to rebuild it (method, its config, teacher and student names)."""
        return type(self).export_student is not Distiller.export_student

    @property
    def performs_own_updates(self) -> bool:
        """True when one training step is several optimiser updates (DML's alternating variant): the
        trainer then calls :meth:`update_step` instead of summing the losses and stepping once."""
        return False

    def update_step(
        self, batch: Batch, progress: Progress, apply_update: Callable[[Tensor], None]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step made of several updates; ``apply_update(loss)`` zeroes the gradients,
        back-propagates ``loss`` and steps the optimiser."""
        raise NotImplementedError

    def param_groups(self, stage: Stage) -> list[dict[str, Any]]:
        """Optimiser parameter groups for a stage; the references apply one weight decay to all."""
        params = list(self.trainable_parameters(stage))
        return [{"params": params}] if params else []

    def ce_and_kd(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Any,
                  student: Outputs | None = None) -> dict[str, Tensor]:
        """``w_ce·CE + w_kd·KD(T)`` from the config's ``ce_weight`` / ``kd_weight`` / ``temperature``: the
        part RepDistiller and SimKD loops add to every method (docs/design.md).

        Detection (``student`` = the student's :class:`Outputs`, required there): the CE part is the detector's own
        loss terms, each scaled by ``ce_weight``, and KD compares the student's and the teacher's ROI class logits
        of the student's sampled proposals (``student_logits`` / ``teacher_logits``), as mdistiller ``detection/``
        (``model/rcnn.py``) adds its logit loss to Detectron2's own losses."""
        cfg = self.cfg
        if self.task.name != DETECTION:
            return ce_and_kd(student_logits, teacher_logits, target, cfg.ce_weight, cfg.kd_weight, cfg.temperature,
                             self.task)
        if student is None:
            raise ValueError("ce_and_kd on detection needs the student's Outputs (student=) for the detector's losses")
        losses: dict[str, Tensor] = {}
        if cfg.ce_weight:
            losses.update({k: cfg.ce_weight * v for k, v in self.task_loss_terms(student, target).items()})
        losses.update(ce_and_kd(student_logits, teacher_logits, target, 0.0, cfg.kd_weight, cfg.temperature))
        return losses

    def logit_targets(self, student: Outputs, batch: Batch) -> Tensor:
        """The class index each row of ``student.logits`` belongs to: ``batch.target``, or on detection the classes
        the student's sampled proposals were assigned (0 = background), concatenated in the order of the ROI logits
        (mdistiller ``detection/model/rcnn.py``: ``gt_classes`` of the sampled proposals, ``torch.cat``-ed)."""
        if self.task.name != DETECTION:
            return batch.target
        labels = getattr(student.detector, "proposal_labels", None)
        if labels is None:
            raise UserInputError(f"method {self.name!r} needs per-proposal class targets, which only a two-stage "
                                 "(Faster R-CNN) student provides")
        return torch.cat(list(labels), dim=0)

    def task_loss_terms(self, student: Outputs, target: Any) -> dict[str, Tensor]:
        """The student's own loss terms: ``{"loss_ce": ...}`` (classification, segmentation), or the detector's
        own losses (torchvision's ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ...)."""
        if student.task_losses is not None:
            return dict(student.task_losses)
        return {"loss_ce": self.task_loss(student.logits, target)}

    def task_loss(self, student_logits: Tensor, target: Tensor) -> Tensor:
        """The task's own loss of the student's output (cross-entropy; per pixel, ignore label excluded, on
        segmentation)."""
        return cross_entropy(student_logits, target, self.task)

    # ---- machinery ----------------------------------------------------------------------------
    @property
    def uses_teacher_features(self) -> bool:
        return bool(self.teacher_taps) or self.teacher_train_mode

    def extra_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.named_children() if n not in ("student", "teacher")}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters belonging neither to teacher nor student (connectors, embeddings, ...)."""
        frozen = {id(p) for m in (self.student, self.teacher) if m is not None for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def num_extra_parameters(self) -> int:
        return sum(p.numel() for p in self.extra_parameters())

    def parameter_set_names(self) -> list[str]:
        """What a stage's ``trainable`` may name: ``student``, ``extra`` and each extra module attribute
        (methods with their own sets extend this, with :meth:`parameter_set`)."""
        return ["student", "extra", *self.extra_modules(), *self.parameter_sets]

    def parameter_set(self, name: str) -> list[nn.Parameter]:
        """The parameters a stage's ``trainable`` entry ``name`` stands for."""
        if name == "extra":
            return self.extra_parameters()
        module = getattr(self, name, None) if name in self.parameter_set_names() else None
        if not isinstance(module, nn.Module):
            raise UserInputError(
                f"a stage of {self.name} trains {name!r}, which is not one of its parameter sets "
                f"{self.parameter_set_names()}"
            )
        return list(module.parameters())

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for part in stage.trainable:
            for p in self.parameter_set(part):
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    yield p

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            # The teacher stays frozen in eval mode whatever the trainer asks (except OFD's declared
            # train-mode teacher, which still gets no gradients).
            self.teacher.train(self.teacher_train_mode and mode)
        return self

    def probe_student(self) -> Outputs:
        return probe_shapes(self.student, self.input_shape)

    def probe_teacher(self) -> Outputs:
        assert self.teacher is not None
        return probe_shapes(self.teacher, self.input_shape)

    def check_dense_logits_agree(self, purpose: str) -> None:
        """UserInputError unless student and teacher class-score maps (``dense_logits``) have one shape, for the
        methods that compare them pixel by pixel (CWD, pixel KD)."""
        student_map, teacher_map = self.probe_student().dense_logits, self.probe_teacher().dense_logits
        if student_map is None or teacher_map is None or student_map.shape[1:] != teacher_map.shape[1:]:
            shapes = [None if m is None else tuple(m.shape[1:]) for m in (student_map, teacher_map)]
            raise UserInputError(
                f"{purpose}, which must agree: student {shapes[0]}, teacher {shapes[1]} (use the same number of "
                "classes and output stride)"
            )

    def teacher_forward(self, batch: Batch) -> Outputs | None:
        if self.teacher_extractor is None:
            return None
        if batch.teacher_logits is not None and not self.uses_teacher_features:
            return Outputs(logits=batch.teacher_logits)
        # no_grad, not inference_mode: the teacher's outputs enter the losses' autograd graphs, which may
        # save them for backward, and inference tensors cannot be saved (they would need a copy). The
        # forward itself costs the same either way (resnet32x4, batch 64, 2 CPU threads: 0.470 vs 0.471 s).
        with torch.no_grad():
            return self.teacher_extractor(batch.image).detach()

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        if self.task.name == DETECTION:
            student_out, teacher_out = self.detector_forwards(batch)
        else:
            teacher_out = self.teacher_forward(batch)
            student_out = self.student_extractor(batch.image)
        losses = self.compute_losses(student_out, teacher_out, batch, progress)
        return student_out.logits, losses

    def detector_forwards(self, batch: Batch) -> tuple[Outputs, Outputs | None]:
        """Detection: the student's training forward opened up (its losses, FPN levels, sampled proposals and
        their ROI logits), then the teacher, in eval mode and without gradients, on the same raw images with its
        own transform, its ROI head classifying the student's proposals (mdistiller ``detection/``,
        docs/design.md, Tasks). ``logits`` = the ROI class logits of those proposals."""
        det = detector_forward_with_taps(self.student, batch.image, batch.target)
        student_out = Outputs(logits=det.class_logits, task_losses=det.losses, detector=det)
        if self.teacher is None or not self.requires_teacher:
            return student_out, None
        with torch.no_grad():
            proposals = None if det.proposals is None else [p.detach() for p in det.proposals]
            t = teacher_forward_with_taps(self.teacher, batch.image, proposals, det.images.image_sizes)
        return student_out, Outputs(logits=t.class_logits, detector=t)

    def forward_train(
        self, image: Tensor, target: Tensor, epoch: int = 1, **extras: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """mdistiller's contract. ``extras`` may hold ``index``, ``teacher_logits``, ``crop``, CRD's negatives as
        ``contrast_index`` (or mdistiller's ``contrastive_index``, RepDistiller's ``contrast_idx``), and the
        progress fields ``epochs`` and ``stage``."""
        progress = Progress(epoch=epoch, epochs=extras.pop("epochs", 240), stage=extras.pop("stage", MAIN_STAGE))
        for alias in CONTRAST_INDEX_ALIASES:
            if alias in extras:
                if "contrast_index" in extras:
                    raise TypeError(f"forward_train got both contrast_index and {alias}")
                extras["contrast_index"] = extras.pop(alias)
        fields = [f.name for f in dataclasses.fields(Batch) if f.name not in ("image", "target")]
        unknown = sorted(set(extras) - set(fields))
        if unknown:
            raise TypeError(f"forward_train got unexpected keywords {unknown}; a batch carries {fields}")
        return self.training_step(Batch(image, target, **extras), progress)

    def forward_test(self, image: Tensor) -> Tensor:
        return self.export_student()(image)

    def forward(self, batch: Batch | Tensor, progress: Progress | None = None) -> Any:
        """``forward(Batch, Progress)`` is one training step (what the trainer calls, through DDP when
        distributed); ``forward(images)`` is inference with the deployed student."""
        if isinstance(batch, Batch):
            return self.training_step(batch, progress or Progress())
        return self.forward_test(batch)

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Networks the trainer evaluates every epoch (DML: every peer); the first one is "the" model."""
        return {"student": self.export_student()}

    def method_state_dict(self) -> dict[str, Tensor]:
        """Everything to checkpoint except the (frozen, separately loaded) teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_method_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise UserInputError(
                f"{self.name} checkpoint does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )


def build_method_config(cls: type[Distiller], cfg: Any, hparams: dict[str, Any]) -> Any:
    """Typed method config: reference defaults, then ``cfg`` (dataclass / dict / DictConfig), then
    keyword overrides. Unknown keys and wrong types raise :class:`UserInputError` naming the key."""
    if not dataclasses.is_dataclass(cls.Config):
        return None
    overrides = method_values(cfg, hparams)
    overrides.pop("name", None)
    overrides.pop("stages", None)  # validated by stage_overrides()
    return merge_into_schema(cls.Config, overrides, path=f"method ({cls.name})")


def method_values(cfg: Any, hparams: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (dataclass / dict / DictConfig / None) as a plain dict, updated with keyword overrides."""
    values: dict[str, Any] = {}
    if cfg is not None:
        values.update(cfg if isinstance(cfg, dict) else OmegaConf.to_container(OmegaConf.create(cfg)))
    values.update(hparams)
    return values


def stage_overrides(cfg: Any, hparams: dict[str, Any]) -> list[StageOverride]:
    raw = method_values(cfg, hparams).get("stages")
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)) and not OmegaConf.is_list(raw):
        raise UserInputError("method.stages must be a list of {name, epochs, trainable, lr, use_schedule} entries")
    return [merge_into_schema(StageOverride, dict(entry), path=f"method.stages[{i}]") for i, entry in enumerate(raw)]

"""The two-stage schedule AB, FSP and FT share: RepDistiller's ``helper/pretrain.py init`` trains some modules
on the method's own loss for ``init_epochs`` (constant lr, no schedule), then the main stage runs.

Not a method module: the registry does not import it (``_ensure_loaded`` in ``kdzoo/methods/registry.py``).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kdzoo.methods.base import Distiller
from kdzoo.methods.losses import feature_body
from kdzoo.models.taps import Outputs
from kdzoo.types import INIT_STAGE, MAIN_STAGE, Batch, Progress, Stage


class InitStageDistiller(Distiller):
    """An init stage (skipped when the config's ``init_epochs`` is 0) followed by the main stage.

    A subclass names what each stage trains (``init_trainable``, ``main_trainable``); its config has
    ``init_epochs`` and ``init_lr`` (None: the optimiser's base lr, unless :meth:`init_stage_lr` says otherwise).
    """

    declared_stages = (INIT_STAGE, MAIN_STAGE)
    init_trainable: ClassVar[tuple[str, ...]] = ()
    main_trainable: ClassVar[tuple[str, ...]] = ("student",)

    def init_stage_lr(self) -> float | None:
        return self.cfg.init_lr

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        init = Stage(name=INIT_STAGE, epochs=cfg.init_epochs, trainable=self.init_trainable, lr=self.init_stage_lr(),
                     use_schedule=False)
        main = Stage(name=MAIN_STAGE, trainable=self.main_trainable)
        return [init, main] if cfg.init_epochs > 0 else [main]


class BodyInitDistiller(InitStageDistiller):
    """AB and FSP: the init stage trains the student's feature extractor (``student_body``, its parameters
    without the classifier's: RepDistiller's ``get_feat_modules``) on :meth:`init_losses` alone; the main stage
    is cross-entropy, plus KD when ``kd_weight`` is set (RepDistiller's loop sets ``loss_kd = 0`` for both), and
    without KD it runs no teacher forward (RepDistiller runs one that nothing reads)."""

    parameter_sets = ("student_body",)
    student_body: nn.Module

    def build(self) -> None:
        """Subclasses extend this (``super().build()`` first). ``student_body`` is a parameter view, not a child
        module (``object.__setattr__`` keeps it out of the module tree): it owns no state_dict entries."""
        object.__setattr__(self, "student_body", feature_body(self.student))

    def init_losses(self, student: Outputs, teacher: Outputs) -> dict[str, Tensor]:
        """The init stage's loss terms."""
        raise NotImplementedError

    def compute_losses(self, student: Outputs, teacher: Outputs | None, batch: Batch,
                       progress: Progress) -> dict[str, Tensor]:
        if progress.stage == INIT_STAGE:
            assert teacher is not None
            return self.init_losses(student, teacher)
        teacher_logits = teacher.logits if teacher is not None else None
        return self.ce_and_kd(student.logits, teacher_logits, batch.target)

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        if progress.stage == INIT_STAGE or self.cfg.kd_weight:
            return super().training_step(batch, progress)
        # Main stage without KD: nothing reads the teacher's outputs, so the teacher is not run.
        student_out = self.student_extractor(batch.image)
        return student_out.logits, self.compute_losses(student_out, None, batch, progress)

"""MLKD — Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023 (docs/methods/mlkd.md). Reference:
Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py`` (``KD_ours.forward_train``), trained
by ``tools/train_ours.py`` with ``SOLVER.TRAINER: ours`` (``AugTrainer`` in ``mdistiller/engine/trainer.py``), whose
loader (``get_cifar100_dataloaders_strong`` in ``mdistiller/dataset/cifar100.py``) yields a weak view (crop + flip)
and a strong view (its own crop + flip, then RandAugment + Cutout) of every sample. kdzoo's data pipeline delivers
the strong view as ``Batch.strong_image`` because this method declares ``needs_strong_view``.

Both networks run on both views; the losses, each at every temperature of ``temperatures``, are
instance-level KL (``loss_kd``), class-level alignment of the C x C Gram matrices of the softmax outputs
(``loss_cc``) and batch-level alignment of their B x B Gram matrices (``loss_bc``), plus cross-entropy on both views.
Quirks of the reference kept for parity (docs/methods/mlkd.md, "Parity notes"):

- the "masked" terms are masked after the batch mean: ``kd_loss`` (and ``cc_loss`` / ``bc_loss``) return a scalar
  there (their ``reduce=False`` is commented out), so ``(scalar * mask).mean()`` scales the batch-mean loss by the
  fraction of samples (classes) the mask keeps (about one half with the 50th percentile), whichever they are;
- the masks keep the samples (classes) whose teacher confidence is AT OR BELOW the percentile (``le``);
- the strong view's instance sum takes the weak view's logits at its last two temperatures (``strong_kd_views``);
- the strong view's class- and batch-level terms are computed there but never returned, so they are left out;
- only the instance-level terms carry the T^2 factor.

MLKD+LS (``mlkd_ls``): the logit-standardization repository's ``MLKD.py`` (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/MLKD.py``) Z-scores the logits inside the instance-level KL only; the masks and the Gram
terms keep the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.logit_std import standardize_logits
from kdzoo.methods.losses import at_least_fp32, autocast_off, cross_entropy, kd_loss
from kdzoo.methods.registry import register_method
from kdzoo.types import Batch, Progress

VIEWS = ("weak", "strong")


@dataclass
class MLKDConfig:
    # KD_ours.forward_train: cfg.KD.TEMPERATURE (mdistiller/engine/cfg.py KD.TEMPERATURE 4), then the literals
    # 3.0, 5.0, 2.0, 6.0, in this order.
    temperatures: list[float] = field(default_factory=lambda: [4.0, 3.0, 5.0, 2.0, 6.0])
    # loss_kd_strong's view at each temperature: its 4th and 5th terms pass logits_student_weak / logits_teacher_weak.
    strong_kd_views: list[str] = field(default_factory=lambda: ["strong", "strong", "strong", "weak", "weak"])
    mask_percentile: float = 50.0  # np.percentile(confidence, 50) for both the sample and the class mask
    ce_weight: float = 0.1  # cfg.py KD.LOSS.CE_WEIGHT 0.1 (res32x4_res8x4.yaml sets no KD keys)
    kd_weight: float = 0.9  # cfg.py KD.LOSS.KD_WEIGHT 0.9, which weighs every kd, cc and bc term


def confidence_masks(teacher_logits: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    """(samples [B], classes [C]) whose teacher confidence is at or below its ``percentile``-th percentile
    (linear interpolation, ``np.percentile``'s default): a sample's confidence is its largest softmax probability
    (temperature 1), a class's the sum of its probabilities over the batch."""
    probs = F.softmax(at_least_fp32(teacher_logits.detach()), dim=1)
    sample_confidence = probs.amax(dim=1)
    class_confidence = probs.sum(dim=0)
    q = percentile / 100.0
    return (sample_confidence <= torch.quantile(sample_confidence, q),
            class_confidence <= torch.quantile(class_confidence, q))


def gram_alignment(student_logits: Tensor, teacher_logits: Tensor, temperature: float, over: str) -> Tensor:
    """``over="classes"``: sum ||P_t^T P_t - P_s^T P_s||^2 / C (``cc_loss``); ``over="samples"``:
    sum ||P_t P_t^T - P_s P_s^T||^2 / B (``bc_loss``); P = softmax(z / T), no T^2 factor."""
    with autocast_off(student_logits):
        p_s = F.softmax(at_least_fp32(student_logits) / temperature, dim=1)
        p_t = F.softmax(at_least_fp32(teacher_logits) / temperature, dim=1)
        if over == "classes":
            return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / p_s.shape[1]
        return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]


@register_method("mlkd")
class MLKD(Distiller):
    Config = MLKDConfig
    needs_strong_view = True

    def build(self) -> None:
        cfg = self.cfg
        if not cfg.temperatures or any(t <= 0 for t in cfg.temperatures):
            raise UserInputError(f"method.temperatures must be a non-empty list of positive numbers, got "
                                 f"{list(cfg.temperatures)}")
        if len(cfg.strong_kd_views) != len(cfg.temperatures) or any(v not in VIEWS for v in cfg.strong_kd_views):
            raise UserInputError(f"method.strong_kd_views names the view ({' or '.join(VIEWS)}) of each of the "
                                 f"{len(cfg.temperatures)} temperatures, got {list(cfg.strong_kd_views)}")
        if not 0.0 <= cfg.mask_percentile <= 100.0:
            raise UserInputError(f"method.mask_percentile must be in [0, 100], got {cfg.mask_percentile}")

    def training_step(self, batch: Batch, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.strong_image is None:
            raise UserInputError(f"method {self.name!r} trains on a strongly augmented second view, but the batch "
                                 "has no strong_image (kdzoo's in-memory loaders add it for methods that declare "
                                 "needs_strong_view)")
        teacher_weak = self.teacher_forward(batch)  # the teacher cache, where one is open, serves this view
        teacher_strong = self.teacher_forward(Batch(batch.strong_image, batch.target))
        assert teacher_weak is not None and teacher_strong is not None
        # Two student forwards, weak first, as the reference: batch-norm sees each view's own statistics.
        student_weak = self.student_extractor(batch.image).logits
        student_strong = self.student_extractor(batch.strong_image).logits
        logits = {"weak": (student_weak, teacher_weak.logits), "strong": (student_strong, teacher_strong.logits)}
        return student_weak, self.mlkd_losses(logits, batch.target)

    def mlkd_losses(self, logits: dict[str, tuple[Tensor, Tensor]], target: Tensor) -> dict[str, Tensor]:
        """``logits``: view -> (student logits, teacher logits) for ``weak`` and ``strong``."""
        cfg = self.cfg
        (student_weak, teacher_weak), student_strong = logits["weak"], logits["strong"][0]
        sample_mask, class_mask = confidence_masks(teacher_weak, cfg.mask_percentile)

        def instance(view: str, temperature: float) -> Tensor:
            student, teacher = logits[view]
            return kd_loss(self.distilled_logits(student), self.distilled_logits(teacher), temperature)

        kd_weak = sum(instance("weak", t) for t in cfg.temperatures) * sample_mask.float().mean()
        kd_strong = sum(instance(v, t) for v, t in zip(cfg.strong_kd_views, cfg.temperatures, strict=True))
        cc = sum(gram_alignment(student_weak, teacher_weak, t, "classes") for t in cfg.temperatures)
        bc = sum(gram_alignment(student_weak, teacher_weak, t, "samples") for t in cfg.temperatures)
        return {
            "loss_ce": cfg.ce_weight * (cross_entropy(student_weak, target) + cross_entropy(student_strong, target)),
            "loss_kd": cfg.kd_weight * (kd_weak + kd_strong),
            "loss_cc": cfg.kd_weight * cc * class_mask.float().mean(),
            "loss_bc": cfg.kd_weight * bc * sample_mask.float().mean(),
        }

    def distilled_logits(self, logits: Tensor) -> Tensor:
        """The logits the instance-level KL compares; ``mlkd_ls`` Z-scores them."""
        return logits


@dataclass
class MLKDLSConfig(MLKDConfig):
    # The LS README's MLKD+LS command: --logit-stand --base-temp 2 --kd-weight 9; its tools/train.py sets
    # KD.TEMPERATURE = 2 (the first temperature; the literals 3, 5, 2, 6 stay) and KD.LOSS.KD_WEIGHT = 9.
    temperatures: list[float] = field(default_factory=lambda: [2.0, 3.0, 5.0, 2.0, 6.0])
    kd_weight: float = 9.0
    # ce_weight stays 0.1: the command leaves KD.LOSS.CE_WEIGHT to the LS cfg.py, 0.1 since the commit (2024-03-10)
    # that added configs/cifar100/mlkd/*.yaml, whose 480 epochs the published log runs; the cfg.py committed with
    # the logs (2024-03-01) had 1 (docs/methods/mlkd.md, MLKD+LS).


@register_method("mlkd_ls")
class MLKDLogitStandardization(MLKD):
    """MLKD with Z-scored logits in its instance-level KL terms (docs/methods/mlkd.md, MLKD+LS)."""

    Config = MLKDLSConfig

    def distilled_logits(self, logits: Tensor) -> Tensor:
        return standardize_logits(logits)

"""Evaluation of a trained network, one evaluator per task (docs/design.md, Tasks).

Each evaluator returns a flat ``{name: float}`` record; the task's *primary* metric (top-1 accuracy,
mean IoU) is what "best" means for checkpoints and summaries. Counts stay on the device until the end
of the pass: one host read per evaluation, and under DDP one all-reduce of the counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.engine.det_metrics import evaluate_detection
from kdzoo.engine.runtime import autocast
from kdzoo.errors import UserInputError
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION, Batch, TaskSpec


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator needs besides the model and the batches."""

    task: TaskSpec
    num_classes: int
    amp: bool = False
    dtype: torch.dtype = torch.bfloat16
    # The evaluation split is sharded over the processes (segmentation's): counts are all-reduced.
    sharded: bool = False


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, amp: bool = False,
             dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` on ``batches``."""
    return evaluate_classification(model, batches, EvalContext(TaskSpec(), 0, amp, dtype))


@torch.no_grad()
def evaluate_classification(model: nn.Module, batches: Iterable[Batch], ctx: EvalContext) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = None
    count = 0
    for batch in batches:
        with autocast(batch.image.device, ctx.amp, ctx.dtype):
            logits = model(batch.image)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == batch.target[:, None]
        c1, c5 = hits[:, 0].sum(), hits.any(dim=1).sum()
        ls = F.cross_entropy(logits, batch.target, reduction="sum")
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        loss_sum = ls if loss_sum is None else loss_sum + ls
        count += batch.target.numel()
    model.train(was_training)
    if count == 0:
        raise UserInputError("the evaluation split is empty")
    return {
        "top1": 100.0 * float(correct1) / count,  # type: ignore[arg-type]
        "top5": 100.0 * float(correct5) / count,  # type: ignore[arg-type]
        "loss": float(loss_sum) / count,  # type: ignore[arg-type]
    }


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``[K, K]`` int64 counts, rows = true class, columns = predicted; ``ignore_index`` pixels left out
    (pytorch-deeplab-xception ``utils/metrics.py`` Evaluator, here one ``bincount`` on the device)."""
    valid = target != ignore_index
    codes = target[valid] * num_classes + prediction[valid]
    return torch.bincount(codes, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(matrix: Tensor) -> dict[str, float]:
    """Pixel accuracy, mean class accuracy, per-class IoU, mean IoU and frequency-weighted IoU (%), from a
    confusion matrix. Classes absent from both the labels and the predictions have no IoU and are left out
    of the mean (nanmean, as the reference Evaluator)."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    per_true, per_pred = matrix.sum(1), matrix.sum(0)
    union = per_true + per_pred - true_positive
    iou = true_positive / union  # nan where the class never occurs
    class_acc = true_positive / per_true
    total = matrix.sum()
    frequency = per_true / total
    present = union > 0
    scores = {
        "miou": 100.0 * float(iou[present].mean()),
        "pixel_acc": 100.0 * float(true_positive.sum() / total),
        "mean_acc": 100.0 * float(class_acc[per_true > 0].mean()),
        "fwiou": 100.0 * float((frequency[present] * iou[present]).sum()),
    }
    scores.update({f"iou/{k}": 100.0 * float(v) for k, v in enumerate(iou.tolist()) if present[k]})
    return scores


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable[Batch], ctx: EvalContext) -> dict[str, float]:
    """mIoU and friends over the evaluation split, plus the mean per-pixel cross-entropy (``loss``)."""
    was_training = model.training
    model.eval()
    k, ignore = ctx.num_classes, ctx.task.ignore_index
    matrix = loss_sum = pixels = None
    for batch in batches:
        with autocast(batch.image.device, ctx.amp, ctx.dtype):
            logits = model(batch.image)
        logits = logits.float()
        if logits.shape[-2:] != batch.target.shape[-2:]:
            raise UserInputError(
                f"the model's output is {tuple(logits.shape[-2:])} but the masks are {tuple(batch.target.shape[-2:])}:"
                " a segmentation model must return logits at the input resolution"
            )
        counts = confusion_matrix(logits.argmax(1), batch.target, k, ignore)
        loss = F.cross_entropy(logits, batch.target, ignore_index=ignore, reduction="sum")
        valid = (batch.target != ignore).sum()
        matrix = counts if matrix is None else matrix + counts
        loss_sum = loss if loss_sum is None else loss_sum + loss
        pixels = valid if pixels is None else pixels + valid
    model.train(was_training)
    if matrix is None:
        if not ctx.sharded:
            raise UserInputError("the evaluation split is empty")
        device = next(model.parameters()).device
        matrix = torch.zeros(k, k, dtype=torch.long, device=device)
        loss_sum, pixels = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    if ctx.sharded and dist.is_available() and dist.is_initialized():
        totals = torch.cat([matrix.flatten().double(), loss_sum.double().view(1), pixels.double().view(1)])
        dist.all_reduce(totals)
        matrix, loss_sum, pixels = totals[:-2].round().long().view(k, k), totals[-2], totals[-1]
    if int(matrix.sum()) == 0:
        raise UserInputError("the evaluation split has no labelled pixels (every pixel is the ignore label)")
    scores = segmentation_scores(matrix)
    scores["loss"] = float(loss_sum) / max(float(pixels), 1.0)
    return scores


Evaluator = Callable[[nn.Module, Iterable[Batch], EvalContext], dict[str, float]]

# What each task evaluates and which of its metrics decides "best" (higher is better for both).
EVALUATORS: dict[str, Evaluator] = {CLASSIFICATION: evaluate_classification, SEGMENTATION: evaluate_segmentation,
                                    DETECTION: evaluate_detection}
PRIMARY_METRIC: dict[str, str] = {CLASSIFICATION: "top1", SEGMENTATION: "miou", DETECTION: "map"}

"""Segmentation metrics against a hand computation (numpy, explicit counts) and the classification evaluator's
contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdzoo.engine.metrics import EvalContext, confusion_matrix, evaluate_segmentation, segmentation_scores
from kdzoo.errors import UserInputError
from kdzoo.types import Batch, TaskSpec

IGNORE = 255


def _hand_scores(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, float]:
    valid = target != IGNORE
    ious, accs, freq = [], [], []
    for c in range(k):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            freq.append(np.sum((target == c) & valid) / valid.sum())
        if tp + fn:
            accs.append(tp / (tp + fn))
    return {"miou": 100 * np.mean(ious), "pixel_acc": 100 * np.sum((pred == target) & valid) / valid.sum(),
            "mean_acc": 100 * np.mean(accs), "fwiou": 100 * float(np.dot(freq, ious))}


def test_confusion_matrix_and_scores_match_a_hand_count() -> None:
    gen = torch.Generator().manual_seed(0)
    k = 4
    target = torch.randint(0, k, (3, 7, 9), generator=gen)
    target[0, :2] = IGNORE
    target[target == 3] = 2  # class 3 never labelled ...
    pred = torch.randint(0, k - 1, (3, 7, 9), generator=gen)  # ... nor predicted: no IoU, left out of the mean
    matrix = confusion_matrix(pred, target, k, IGNORE)
    assert matrix.sum().item() == int((target != IGNORE).sum())
    assert matrix[1, 2].item() == int(((target == 1) & (pred == 2)).sum())
    scores = segmentation_scores(matrix)
    expected = _hand_scores(pred.numpy(), target.numpy(), k)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=1e-12), name
    assert "iou/3" not in scores and "iou/0" in scores


class _Constant(nn.Module):
    """Predicts class 1 everywhere except the left column (class 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:]) + self.anchor
        logits[:, 1] = 1.0
        logits[:, 1, :, 0] = -1.0
        return logits


def test_evaluate_segmentation_ignores_the_void_label() -> None:
    target = torch.ones(1, 2, 3, dtype=torch.long)
    target[0, :, 0] = 0
    target[0, 0, 2] = IGNORE  # would be right anyway; a wrong void pixel must not count either
    target_wrong_void = target.clone()
    target_wrong_void[0, 1, 2] = IGNORE
    ctx = EvalContext(TaskSpec("segmentation"), num_classes=2)
    scores = evaluate_segmentation(_Constant(), [Batch(torch.zeros(1, 3, 2, 3), target)], ctx)
    assert scores["miou"] == pytest.approx(100.0) and scores["pixel_acc"] == pytest.approx(100.0)
    with pytest.raises(UserInputError, match="input resolution"):
        evaluate_segmentation(_Constant(), [Batch(torch.zeros(1, 3, 2, 3), target[:, :1])], ctx)
    with pytest.raises(UserInputError, match="empty"):
        evaluate_segmentation(_Constant(), [], ctx)

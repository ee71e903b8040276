"""Helpers shared by the logit-method tests (DIST, CTKD, logit standardisation, Jacobian matching): small
example logits and one training step on a real teacher/student pair."""

from __future__ import annotations

from typing import Any

import torch

import kdzoo
from kdzoo.methods.base import Distiller
from kdzoo.types import Batch, Progress

HETEROGENEOUS_PAIRS = [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")]

# 3 samples x 4 classes.
STUDENT_LOGITS = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-2.0, 0.7, 0.4, 0.0]]
TEACHER_LOGITS = [[3.0, -1.0, 1.0, 0.0], [0.5, 0.0, -2.0, 2.5], [-1.0, 2.0, 0.5, -0.5]]
TARGETS = [2, 3, 1]


def train_one_step(method: str, teacher_name: str = "resnet32x4", student_name: str = "resnet8x4",
                   batch_size: int = 4, epoch: int = 1, **hparams: Any) -> tuple[Distiller, dict[str, torch.Tensor]]:
    """One forward + backward; asserts finite scalar losses, a finite non-zero gradient on every student
    parameter and none on the teacher."""
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student, **hparams)
    distiller.train()
    images, labels = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 100, (batch_size,))
    _, losses = distiller.training_step(Batch(images, labels), Progress(epoch=epoch))
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    sum(losses.values()).backward()
    for name, p in distiller.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    return distiller, losses

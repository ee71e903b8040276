"""The same distiller code runs unchanged with a timm: or torchvision: teacher and a CIFAR student
(small random-weight models, no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.types import Batch, DatasetInfo, Progress

TEACHERS = ["timm:resnet18", "torchvision:resnet18"]
METHODS = ["kd", "dkd", "fitnet", "at", "crd", "rkd", "simkd", "reviewkd", "vid"]


@pytest.mark.parametrize("teacher_name", TEACHERS)
@pytest.mark.parametrize("method", METHODS)
def test_foreign_teacher_with_cifar_student(teacher_name, method):
    torch.manual_seed(0)
    teacher = kdzoo.create_model(teacher_name, num_classes=10)
    student = kdzoo.create_model("resnet8x4", num_classes=10)
    distiller = kdzoo.create_distiller(method, teacher=teacher, student=student)
    distiller.bind_dataset(DatasetInfo(64, 10, torch.arange(64) % 10))
    distiller.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    bn_before = {n: b.clone() for n, b in teacher.named_buffers() if "running_mean" in n}
    _, losses = distiller.training_step(batch, Progress(epoch=30))
    total = sum(losses.values())
    assert math.isfinite(float(total.detach()))
    total.backward()
    assert student.conv1.weight.grad is not None and torch.isfinite(student.conv1.weight.grad).all()
    assert all(p.grad is None for p in teacher.parameters())
    for n, b in teacher.named_buffers():  # eval-mode teacher: BatchNorm statistics untouched by taps
        if n in bn_before:
            assert torch.equal(b, bn_before[n]), n

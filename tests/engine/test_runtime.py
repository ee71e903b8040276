"""runtime.deterministic: deterministic kernels where PyTorch has them, never a crash where it has none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdzoo.engine.runtime import set_deterministic


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_warns_instead_of_raising(restore_determinism):
    set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    # On CUDA, cross-entropy (NLLLoss) and adaptive pooling's backward have no deterministic kernel in
    # torch 2.14; strict mode would raise at the first step of every run. Warn-only lets them run.
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    loss = F.cross_entropy(F.adaptive_avg_pool2d(x, 1).flatten(1), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()

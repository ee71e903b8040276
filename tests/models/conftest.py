"""Shared fixtures of the model-zoo tests: the golden fixtures in ``../shared/golden/models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import GOLDEN, require_shared

GOLDEN_MODELS = GOLDEN / "models"
_WHAT = "golden model fixtures"


def _names(pattern: str) -> list[str]:
    return sorted(p.stem for p in GOLDEN_MODELS.glob(pattern)) if GOLDEN_MODELS.is_dir() else []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``manifest_name``: every model with a JSON manifest; ``golden_name``: every model with stored weights.
    Without the fixtures: one skipped case locally, a collection error under CI (``require_shared``)."""
    for fixture, pattern in (("manifest_name", "*.json"), ("golden_name", "*.pt")):
        if fixture in metafunc.fixturenames:
            params = _names(pattern)
            if not params:
                try:
                    require_shared(GOLDEN_MODELS, _WHAT)
                    pytest.fail(f"no {pattern} files in {GOLDEN_MODELS}: incomplete golden fixtures", pytrace=False)
                except pytest.skip.Exception as skipped:
                    params = [pytest.param(None, marks=pytest.mark.skip(reason=skipped.msg))]
            metafunc.parametrize(fixture, params)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared(GOLDEN_MODELS, _WHAT)


@pytest.fixture(scope="session")
def load_manifest(golden_dir: Path):  # noqa: ANN201 - returns a loader
    def load(name: str) -> dict[str, Any]:
        return json.loads((golden_dir / f"{name}.json").read_text())

    return load


_GOLDEN_CACHE: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def load_golden(golden_dir: Path):  # noqa: ANN201 - returns a loader
    def load(name: str) -> dict[str, Any]:
        if name not in _GOLDEN_CACHE:
            _GOLDEN_CACHE[name] = torch.load(golden_dir / f"{name}.pt", weights_only=True)
        return _GOLDEN_CACHE[name]

    return load


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so BN/tap mistakes cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


@pytest.fixture
def randomize():  # noqa: ANN201 - returns the helper
    return randomize_norms

"""Shared test fixtures. Shared data is reached as ../shared relative to the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
DATA_ROOT = SHARED / "data"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "cifar-100-python").is_dir():
        pytest.skip(f"CIFAR-100 not found under {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def golden_common(golden_dir: Path) -> dict:
    return torch.load(golden_dir / "common.pt", weights_only=True)

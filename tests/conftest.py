"""Shared test fixtures. Shared data is reached as ../shared relative to the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
DATA_ROOT = SHARED / "data"


def running_in_ci() -> bool:
    """CI services set ``CI`` (GitHub Actions: ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_shared(path: Path, what: str) -> Path:
    """``path`` if it is a non-empty directory. Otherwise the calling test is skipped on a developer
    machine, but fails under CI: there a missing ``../shared`` folder is a broken setup, and a green run
    whose golden checks were all skipped would hide it. Called from a fixture or test, or at collection
    time (where the failure becomes a collection error)."""
    if path.is_dir() and any(path.iterdir()):
        return path
    message = f"{what} not found at {path} (the shared folder sits next to the repository)"
    if running_in_ci():
        pytest.fail(f"{message}; under CI this is an error, not a skip", pytrace=False)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared(GOLDEN, "golden fixtures")


@pytest.fixture(scope="session")
def data_root() -> Path:
    require_shared(DATA_ROOT / "cifar-100-python", "CIFAR-100")
    return DATA_ROOT


@pytest.fixture(scope="session")
def golden_common(golden_dir: Path) -> dict:
    return torch.load(golden_dir / "common.pt", weights_only=True)

"""Device, precision, determinism and RNG state: everything a step's numerics depend on."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdzoo.errors import UserInputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"runtime.device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"runtime.device={name} but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        # cuBLAS needs this workspace setting for deterministic matmuls (PyTorch reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some ops every run needs have no deterministic CUDA kernel and would otherwise raise
        # (torch 2.14's list includes NLLLoss, i.e. cross-entropy, and adaptive average pooling's
        # backward); they run with a warning naming them, everything else is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:  # the config decides: a previous run in this process must not leave the mode on
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def amp_dtype(device: torch.device, requested: str) -> torch.dtype:
    if requested == "fp16":
        return torch.float16
    if requested == "bf16":
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> Iterator[None]:
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's key array is stored as a tensor so the checkpoint stays loadable with weights_only.
        "numpy": _numpy_state_to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_safe(state: tuple[Any, ...]) -> list[Any]:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]

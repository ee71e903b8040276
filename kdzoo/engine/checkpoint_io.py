"""Crash-safe training checkpoints.

Each checkpoint is a new file ``ckpt_e{epoch}_s{step}.pt`` written as temp file + fsync + atomic
rename, with its SHA-256 in a ``.sha256`` sidecar written the same way *after* it. A file whose
sidecar is missing or disagrees (a crash between the two renames, a truncated copy, bit rot) is
reported and skipped by ``resume=auto``, which then takes the newest valid one. Loading uses
``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdzoo.digest import file_sha256
from kdzoo.engine.faults import fault_point
from kdzoo.errors import CheckpointError

_STAGE_NAME = re.compile(r"^ckpt_(\d+)_e(\d+)_s(\d+)\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(obj: dict[str, Any], path: Path) -> str:
    """Serialise ``obj`` to ``path`` atomically with a checksum sidecar; returns the digest."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    fault_point("during_save")  # the checkpoint exists, its checksum not yet: must be skipped on resume
    atomic_write_bytes(_sidecar(path), f"{digest}  {path.name}\n".encode())
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify(path: Path) -> str | None:
    """``None`` when the file matches its checksum, else the reason it does not."""
    side = _sidecar(path)
    if not path.is_file():
        return "file is missing"
    if not side.is_file():
        return "checksum file is missing (write interrupted?)"
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    digest = file_sha256(path)
    return None if digest == expected else "checksum mismatch (truncated or corrupt)"


def load_verified(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None


@dataclass(frozen=True, order=True)
class CheckpointRef:
    stage: int
    epoch: int
    step: int
    path: Path


def checkpoint_name(stage: int, epoch: int, step: int) -> str:
    return f"ckpt_{stage}_e{epoch:04d}_s{step:06d}.pt"


def list_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    refs = []
    for p in run_dir.glob("ckpt_*.pt"):
        m = _STAGE_NAME.match(p.name)
        if m:
            refs.append(CheckpointRef(int(m[1]), int(m[2]), int(m[3]), p))
    return sorted(refs)


def newest_valid(run_dir: Path) -> CheckpointRef | None:
    """The newest checkpoint whose checksum verifies; broken newer ones are reported and skipped."""
    for ref in reversed(list_checkpoints(run_dir)):
        problem = verify(ref.path)
        if problem is None:
            return ref
        warnings.warn(f"skipping checkpoint {ref.path.name}: {problem}", stacklevel=2)
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (the best student is exported separately)."""
    refs = list_checkpoints(run_dir)
    for ref in refs[: max(0, len(refs) - keep_last)]:
        for p in (ref.path, _sidecar(ref.path)):
            p.unlink(missing_ok=True)

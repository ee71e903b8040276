"""Per-epoch metrics to JSONL (one object per line, rewritten atomically so resume can truncate it)
and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdzoo.engine.checkpoint_io import atomic_write_bytes


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def restore(self, records: list[dict[str, Any]]) -> None:
        """After a resume: keep exactly the records the checkpoint knew about."""
        self.records = [dict(r) for r in records]
        self._flush()

    def log(self, record: dict[str, Any], step: int) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def _flush(self) -> None:
        if self.enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

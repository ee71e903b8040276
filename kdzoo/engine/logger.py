"""Per-epoch metrics to JSONL (one object per line, rewritten atomically so resume can truncate it),
TensorBoard scalars, and optionally Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdzoo.engine.checkpoint_io import atomic_write_bytes

WANDB_ID_FILE = "wandb_id"


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, wandb_project: str | None = None,
                 run_config: dict[str, Any] | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if enabled and wandb_project:
            self._wandb = _start_wandb(run_dir, wandb_project, run_config or {})

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
            for key, value in _numeric(record).items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({**_numeric(record), "epoch": record.get("epoch")}, step=step)

    def _flush(self) -> None:
        if self.enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, project: str, run_config: dict[str, Any]) -> Any:
    """One W&B run per run directory: its id is kept in the directory, so ``--resume`` continues the same
    W&B run (W&B ignores re-logged steps below its last one) instead of starting a new one."""
    import secrets

    import wandb

    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = f"{run_dir.name}-{secrets.token_hex(4)}"
        atomic_write_bytes(id_file, run_id.encode())
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=run_config)

"""``kdzoo train``: validate and build everything, then create (or resume) the run directory and fit.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins a process group (gloo on CPU, NCCL on
GPU) and trains a DDP replica; ``data.batch_size`` is per process, as in torchvision's references.
With ``resume=auto`` a restarted worker (``torchrun --max-restarts N``) finds the newest valid
checkpoint itself and continues.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdzoo.config.schema import Config
from kdzoo.engine import checkpoint_io
from kdzoo.engine.setup import prepare_run
from kdzoo.engine.stop import TrainingStopped
from kdzoo.engine.trainer import Trainer
from kdzoo.errors import UserInputError


def _init_distributed() -> tuple[int, int, torch.device | None]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # Under torchrun the store outlives a restart and still holds the dead group's addresses, so
        # a restarted group would try to connect to them. A per-restart key prefix keeps rounds apart.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
            is_master=rank == 0 and not agent_store, timeout=timedelta(minutes=10),
        )
        dist.init_process_group(
            backend=backend, store=dist.PrefixStore(f"kdzoo/restart{restart}", store), rank=rank, world_size=world_size
        )
    return rank, world_size, device


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``None`` = fresh run (refused if the directory already holds checkpoints), ``auto`` = newest
    valid checkpoint or a fresh start, anything else = that checkpoint file."""
    if resume is None:
        if run_dir.is_dir() and checkpoint_io.list_checkpoints(run_dir):
            raise UserInputError(
                f"run directory {run_dir} already holds checkpoints: pass --resume (or resume=auto) to continue "
                "it, or choose another experiment.name / experiment.output_dir"
            )
        return None
    if resume == "auto":
        ref = checkpoint_io.newest_valid(run_dir) if run_dir.is_dir() else None
        return ref.path if ref else None
    path = Path(resume)
    problem = checkpoint_io.verify(path)
    if problem is not None:
        raise UserInputError(f"cannot resume from {path}: {problem}")
    return path


def run_training(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    rank, world_size, device = _init_distributed()
    try:
        parts = prepare_run(cfg, rank=rank, world_size=world_size, device=device)
        run_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name
        resume_from = resolve_resume(run_dir, resume)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        if world_size > 1:
            dist.barrier()
        trainer = Trainer(parts, run_dir, is_main=rank == 0)
        if resume_from is not None:
            trainer.load(resume_from)
        try:
            return trainer.fit()
        except TrainingStopped as stopped:
            if world_size > 1:
                # Leave together: a process tearing down gloo under a live peer can abort it. The first to
                # leave makes torchrun SIGTERM the others, which have checkpointed already and are past
                # their handler: they ignore it and exit with their own 128 + signal.
                for signum in {stopped.signum, signal.SIGTERM}:
                    signal.signal(signum, signal.SIG_IGN)
                dist.barrier()
            raise
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

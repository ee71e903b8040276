"""``kdzoo sweep SPEC.yaml``: a grid of ordinary runs (methods x seeds x ...), resumable, locally or on SLURM.

Every cell of the spec (kdzoo/sweep_spec.py) is an ordinary run directory under ``<output_dir>/<name>/``.
``manifest.json`` in the sweep directory lists the cells, their overrides, status and error. Re-running the
same command skips finished cells, resumes interrupted ones from their newest checkpoint and retries failed
ones. docs/sweeps.md is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.helpers import Checkpointable, DelayedSubmission

from kdzoo.config.loader import load_config
from kdzoo.engine import checkpoint_io
from kdzoo.engine.checkpoint_io import atomic_write_bytes
from kdzoo.engine.metrics import PRIMARY_METRIC
from kdzoo.engine.run import run_training
from kdzoo.engine.stop import STOP_SIGNALS, StopRequests, TrainingStopped
from kdzoo.errors import UserInputError
from kdzoo.plot import read_metrics
from kdzoo.report import MANIFEST, run_complete
from kdzoo.sweep_spec import EXECUTORS, Cell, SweepSpec, build_cells, load_spec

CELL_RECIPE = "sweep_cell.yaml"  # the cell's whole recipe, as `kdzoo train` reads it
CELL_LOG = "sweep.log"  # stdout + stderr of a cell run in a subprocess
# SLURM's --signal=USR1@<delay> warns a job ahead of its time limit; kdzoo's graceful stop answers USR1
# (kdzoo/engine/stop.py). submitit's default is USR2, so its jobs are told through SUBMITIT_PREEMPT_SIGNAL.
PREEMPT_SIGNAL = signal.SIGUSR1
PREEMPT_ENV = f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL.name.removeprefix('SIG')}"
POLL_S = 0.2


# ---- state on disk -------------------------------------------------------------------------------

def cell_state(cell: Cell) -> str:
    """done (final export present), resume (checkpoints to continue from) or new."""
    if run_complete(cell.run_dir):
        return "done"
    if cell.run_dir.is_dir() and checkpoint_io.list_checkpoints(cell.run_dir):
        return "resume"
    return "new"


def _check_unchanged(cells: list[Cell]) -> None:
    """A cell that has trained must not silently continue under a different recipe."""
    for cell in cells:
        path = cell.run_dir / CELL_RECIPE
        if not path.is_file() or cell_state(cell) == "new":
            continue
        if yaml.safe_load(path.read_text()) != cell.recipe:
            raise UserInputError(
                f"sweep cell {cell.name} was trained with a different recipe ({path}): restore the spec, or delete "
                "that directory to train it again, or give the sweep another name"
            )


class Manifest:
    """``manifest.json``: the cells with their overrides, run directory, status (pending / running / done /
    failed), error, attempts (times this sweep started the cell) and job id; rewritten atomically."""

    def __init__(self, sweep_dir: Path, spec_path: Path, executor: str, cells: list[Cell], devices: int):
        self.path = sweep_dir / MANIFEST
        previous = {}
        if self.path.is_file():
            previous = {c["name"]: c for c in json.loads(self.path.read_text()).get("cells", [])}
        self.data: dict[str, Any] = {"spec": str(spec_path), "executor": executor, "cells": []}
        for cell in cells:
            old = previous.get(cell.name, {})
            self.data["cells"].append({
                "name": cell.name, "overrides": cell.overrides, "run_dir": str(cell.run_dir),
                "status": "done" if cell_state(cell) == "done" else "pending", "error": None,
                "attempts": int(old.get("attempts", 0)), "job_id": None, "devices": devices,
            })
        self.write()

    def entry(self, name: str) -> dict[str, Any]:
        return next(c for c in self.data["cells"] if c["name"] == name)

    def update(self, name: str, **values: Any) -> None:
        entry = self.entry(name)
        if values.get("status") == "running":
            entry["attempts"] += 1
        entry.update(values)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2, default=str) + "\n").encode())


# ---- running -------------------------------------------------------------------------------------

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _stopped(signum: int) -> str:
    return (f"stopped by {signal.Signals(signum).name}, with a checkpoint: running the sweep again resumes this "
            "cell")


def _finish(manifest: Manifest, cell: Cell, error: str | None) -> None:
    if error is None and not run_complete(cell.run_dir):
        error = "training returned without the final export (student_last.pt)"
    manifest.update(cell.name, status="failed" if error else "done", error=error)


def _threads(cell: Cell, threads: int | None) -> list[str]:
    """Command-line overrides of a cell's run that are not part of its recipe (nor of its identity)."""
    extra = ["runtime.progress=false"]
    if threads is not None and (cell.recipe.get("runtime") or {}).get("threads") is None:
        extra.append(f"runtime.threads={threads}")
    return extra


def run_in_process(cells: list[Cell], manifest: Manifest) -> int | None:
    """One cell after the other in this process. Returns the signal that stopped the sweep, if one did."""
    with StopRequests() as stop:
        for cell in cells:
            if stop.signum:
                return stop.signum
            manifest.update(cell.name, status="running", error=None)
            try:
                cfg = load_config(cell.run_dir / CELL_RECIPE, _threads(cell, None))
                run_training(cfg, resume="auto" if cell_state(cell) == "resume" else None)
            except TrainingStopped as stopped:  # Ctrl-C / SIGTERM during training: checkpointed, stop the sweep
                manifest.update(cell.name, status="failed", error=_stopped(stopped.signum))
                return stopped.signum
            except Exception as exc:  # a failed cell does not stop the others
                if isinstance(exc, UserInputError):
                    print(f"kdzoo: cell {cell.name}: {exc}", file=sys.stderr)
                else:
                    traceback.print_exc()
                manifest.update(cell.name, status="failed", error=f"{type(exc).__name__}: {exc}")
            else:
                _finish(manifest, cell, None)
    return stop.signum


def _command(cell: Cell, threads: int | None) -> list[str]:
    resume = ["--resume"] if cell_state(cell) == "resume" else []
    return [sys.executable, "-m", "kdzoo", "train", str(cell.run_dir / CELL_RECIPE), *_threads(cell, threads),
            *resume]


def _process_error(code: int, log: Path) -> str | None:
    if code == 0:
        return None
    tail = _last_line(log.read_text(errors="replace")) if log.is_file() else ""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}" + (f" after: {tail}" if tail else "")
    if code - 128 in set(STOP_SIGNALS) and "stopped by" in tail:  # kdzoo train's graceful stop (TrainingStopped)
        return _stopped(code - 128)
    return tail or f"exit code {code}"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_subprocesses(cells: list[Cell], manifest: Manifest, concurrent: int) -> int | None:
    """Up to ``concurrent`` `kdzoo train` processes at once, each in its own session (a Ctrl-C reaches the
    sweep only, which passes the stop on once, so every running cell checkpoints)."""
    threads = max(1, available_cores() // concurrent)
    pending = list(cells)
    running: dict[str, tuple[subprocess.Popen, Cell]] = {}
    stopped_by: int | None = None
    with StopRequests() as stop:
        try:
            while pending or running:
                if stop.signum and stopped_by is None:
                    stopped_by = stop.signum
                    pending.clear()
                    for process, _ in running.values():
                        process.send_signal(stopped_by)
                while pending and len(running) < concurrent:
                    cell = pending.pop(0)
                    manifest.update(cell.name, status="running", error=None)
                    with open(cell.run_dir / CELL_LOG, "ab") as log:
                        process = subprocess.Popen(_command(cell, threads), stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
                    running[cell.name] = (process, cell)
                for name, (process, cell) in list(running.items()):
                    code = process.poll()
                    if code is not None:
                        del running[name]
                        _finish(manifest, cell, _process_error(code, cell.run_dir / CELL_LOG))
                time.sleep(POLL_S)
        finally:  # leaving abnormally (a second Ctrl-C): no cell outlives the sweep
            for process, _ in running.values():
                process.kill()
    return stopped_by


class CellJob(Checkpointable):
    """One cell as a submitit job: ``kdzoo train RECIPE --resume``. SLURM's USR1 ahead of the time limit (or a
    preemption notice) makes kdzoo checkpoint at the next step and stop; the signal is then handed to
    submitit, whose handler calls :meth:`checkpoint` and requeues the job, which resumes from that checkpoint."""

    def __call__(self, recipe: str, overrides: list[str]) -> dict[str, Any]:
        cfg = load_config(recipe, overrides)
        try:
            return run_training(cfg, resume="auto")
        except TrainingStopped as stopped:
            if stopped.signum == PREEMPT_SIGNAL and callable(signal.getsignal(stopped.signum)):
                signal.raise_signal(stopped.signum)  # submitit's handler: checkpoint() + requeue, then exits
            raise

    def checkpoint(self, recipe: str, overrides: list[str]) -> DelayedSubmission:
        # The training state is in the run directory already (kdzoo's own checkpoint): the requeued job is the
        # same call, and resume=auto continues from the newest valid checkpoint.
        return DelayedSubmission(CellJob(), recipe, overrides)


def slurm_executor(spec: SweepSpec, folder: Path) -> submitit.AutoExecutor:
    ex = spec.executor
    kwargs = {f"{ex.cluster}_max_num_timeout": ex.max_num_timeout} if ex.cluster != "debug" else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=ex.cluster, **kwargs)
    executor.update_parameters(
        name=spec.name, timeout_min=ex.time_min, cpus_per_task=ex.cpus_per_task, mem_gb=ex.mem_gb,
        slurm_partition=ex.partition, slurm_gpus_per_task=ex.gpus_per_task or None,
        slurm_array_parallelism=ex.array_parallelism, slurm_signal_delay_s=ex.signal_delay_s,
        slurm_setup=[*ex.setup, PREEMPT_ENV],
        slurm_additional_parameters={"signal": f"{PREEMPT_SIGNAL.name.removeprefix('SIG')}@{ex.signal_delay_s}",
                                     **ex.additional_parameters},
        local_setup=[PREEMPT_ENV],
    )
    return executor


def run_submitit(cells: list[Cell], manifest: Manifest, spec: SweepSpec, sweep_dir: Path) -> int | None:
    """A job array of the cells (``executor.map_array``); waits for them, updating the manifest as they end.
    A stop signal to the sweep cancels the jobs (each checkpoints on SLURM's SIGTERM)."""
    executor = slurm_executor(spec, sweep_dir / "submitit")
    threads = spec.executor.cpus_per_task
    jobs = executor.map_array(CellJob(), [str(c.run_dir / CELL_RECIPE) for c in cells],
                              [_threads(c, threads) for c in cells])
    remaining = dict(zip((c.name for c in cells), zip(jobs, cells, strict=True), strict=True))
    for job, cell in remaining.values():
        manifest.update(cell.name, status="running", error=None, job_id=job.job_id)
    with StopRequests() as stop:
        while remaining:
            if stop.signum:
                for job, cell in remaining.values():
                    job.cancel(check=False)
                    manifest.update(cell.name, status="failed", error=f"cancelled: the sweep was stopped by "
                                    f"{signal.Signals(stop.signum).name}; re-run it to resume")
                return stop.signum
            for name, (job, cell) in list(remaining.items()):
                if job.done():
                    del remaining[name]
                    exc = job.exception()
                    _finish(manifest, cell, None if exc is None else _last_line(str(exc)) or type(exc).__name__)
            time.sleep(POLL_S)
    return None


# ---- the command ---------------------------------------------------------------------------------

def _last_metric(cell: Cell) -> str:
    metrics = cell.run_dir / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return "—"
    metric = PRIMARY_METRIC.get(str(cell.recipe.get("task", "classification")), "top1")
    value = read_metrics(cell.run_dir)[-1].get(metric)
    return "—" if value is None else f"{metric} {value:.2f}"


def status_table(manifest: Manifest, cells: list[Cell]) -> str:
    width = max(len(c.name) for c in cells)
    lines = [f"{'cell':{width}s}  {'status':7s}  {'last':>11s}  {'runs':>4s}  run directory / error"]
    for cell in cells:
        entry = manifest.entry(cell.name)
        where = entry["error"] if entry["status"] == "failed" else str(cell.run_dir)
        lines.append(f"{cell.name:{width}s}  {entry['status']:7s}  {_last_metric(cell):>11s}  {entry['attempts']:4d}  "
                     f"{where}")
    return "\n".join(lines)


def run_sweep(spec_path: str | Path, executor: str | None = None, dry_run: bool = False) -> int:
    """Validate every cell, then run those not finished. Exit code: 0 all done, 1 some cell failed, 128 + the
    signal when the sweep was stopped (its cells checkpointed; the same command continues)."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    if executor is not None:
        if executor not in EXECUTORS:
            raise UserInputError(f"--executor must be local or slurm, got {executor!r}")
        spec = dataclasses.replace(spec, executor=dataclasses.replace(spec.executor, name=executor))
    cells = build_cells(spec, spec_path.resolve().parent)
    _check_unchanged(cells)
    if spec.executor.name == "slurm" and spec.executor.cluster == "slurm" and not dry_run and not shutil.which("srun"):
        raise UserInputError("executor slurm submits through SLURM, but srun is not on PATH: run the sweep on the "
                             "cluster's login node, or set executor.cluster: local to try the SLURM path here")
    sweep_dir = Path(spec.output_dir) / spec.name
    states = {cell.name: cell_state(cell) for cell in cells}
    todo = [cell for cell in cells if states[cell.name] != "done"]
    if dry_run:
        print(f"sweep {spec.name}: {len(cells)} cells in {sweep_dir}, {len(todo)} to run ({spec.executor.name})")
        for cell in cells:
            print(f"  {cell.name:{max(len(c.name) for c in cells)}s}  {states[cell.name]:6s}  "
                  + " ".join(f"{k}={v}" for k, v in cell.overrides.items()))
        return 0
    devices = max(1, spec.executor.gpus_per_task) if spec.executor.name == "slurm" else 1
    manifest = Manifest(sweep_dir, spec_path.resolve(), spec.executor.name, cells, devices)
    for cell in todo:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / CELL_RECIPE).write_text(yaml.safe_dump(cell.recipe, sort_keys=False))
    print(f"sweep {spec.name}: {len(cells)} cells, {len(cells) - len(todo)} done already, running {len(todo)} "
          f"({spec.executor.name}{'' if spec.executor.name == 'slurm' else f', {spec.executor.concurrent} at a time'})")
    if spec.executor.name == "slurm":
        stopped = run_submitit(todo, manifest, spec, sweep_dir) if todo else None
    elif spec.executor.concurrent > 1:
        stopped = run_subprocesses(todo, manifest, spec.executor.concurrent)
    else:
        stopped = run_in_process(todo, manifest)
    print(status_table(manifest, cells))
    failed = [c for c in manifest.data["cells"] if c["status"] == "failed"]
    if stopped:
        print(f"kdzoo: sweep stopped by {signal.Signals(stopped).name}; the same command continues it", file=sys.stderr)
        return 128 + stopped
    if failed:
        print(f"kdzoo: {len(failed)} of {len(cells)} cells failed:", file=sys.stderr)
        for entry in failed:
            print(f"  {entry['name']}: {entry['error']}", file=sys.stderr)
        return 1
    print(f"all {len(cells)} cells done; `kdzoo report {sweep_dir}` tabulates them")
    return 0

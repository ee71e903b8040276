"""SIGKILL a real training process at three points, resume, and compare with an uninterrupted run
bit for bit: final student weights, extra-module/method state and every logged metric. SIGTERM and
SIGUSR1 stop it gracefully instead: a checkpoint of the current step, then exit.

Kill points (``kdzoo.engine.faults``): mid-epoch (after the 3rd step, between checkpoints), right
after a checkpoint write, and during a checkpoint write (the file is on disk, its checksum is not,
so ``resume=auto`` must skip it and take the previous one). Runs for KD, the stateful CRD (memory
banks, negative sampler) and DOT (two momentum buffers).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.engine import checkpoint_io
from tests.conftest import REPO_ROOT

METHODS = {
    "kd": ["method.name=kd"],
    "crd": ["method.name=crd", "method.nce_k=64"],
    "dot": ["method.name=kd", "optim.name=dot"],
}
KILLS = {
    "mid_epoch": "point=step,count=3",
    "after_save": "point=after_save,count=2",
    "during_save": "point=during_save,count=4",  # saves: step 2, step 4, best export, end of epoch 1
}
# Every child is waited on until it exits; the deadline only catches a hang. A run takes ~5 s on an idle
# 2-core machine and several times that on a loaded one, so it is generous, and each test's pytest timeout
# is the sum of its children's deadlines (the project-wide 900 s would cut a test of several runs short).
RUN_TIMEOUT_S = 600
MARGIN_S = 120


def _config(tmp_path: Path) -> Path:
    teacher = tmp_path / "teacher.pth"
    if not teacher.exists():
        torch.manual_seed(5)
        torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict()}, teacher)
    path = tmp_path / "run.yaml"
    path.write_text(
        "experiment: {name: run, seed: 11}\n"
        "data: {dataset: mnist5k, batch_size: 32, subset: 160, test_subset: 64}\n"
        f"teacher: {{name: resnet8, checkpoint: {teacher}}}\nstudent: {{name: resnet8}}\n"
        "schedule: {epochs: 2, milestones: [1]}\n"
        "runtime: {device: cpu, deterministic: true, progress: false, tensorboard: false, threads: 1,"
        " checkpoint_interval: 2, log_interval: 1, keep_last: 3}\n"
    )
    return path


def _train(tmp_path: Path, out: Path, extra: list[str], fault: str | None = None, resume: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "KDZOO_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["KDZOO_FAULT"] = fault
    cmd = [sys.executable, "-m", "kdzoo", "train", str(_config(tmp_path)), f"experiment.output_dir={out}", *extra]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _outcome(run_dir: Path) -> tuple[dict, list[dict], dict]:
    student = checkpoint_io.load_verified(run_dir / "student_last.pt")["model"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        record.pop("epoch_time_s")
    final = checkpoint_io.load_verified(checkpoint_io.list_checkpoints(run_dir)[-1].path)
    return student, metrics, final["distiller"] | {"optimizer": final["optimizer"]["state"]}


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def reference(tmp_path_factory):  # noqa: ANN201 - returns a loader
    """The outcome of an uninterrupted run per method, trained once for all the tests of the module."""
    outcomes: dict[str, tuple[dict, list[dict], dict]] = {}

    def outcome(method: str) -> tuple[dict, list[dict], dict]:
        if method not in outcomes:
            tmp_path = tmp_path_factory.mktemp(f"reference_{method}")
            ref = _train(tmp_path, tmp_path / "ref", METHODS[method])
            assert ref.returncode == 0, ref.stderr[-2000:]
            outcomes[method] = _outcome(tmp_path / "ref" / "run")
        return outcomes[method]

    return outcome


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + MARGIN_S)  # the reference run (first test of a method), crash, resume
@pytest.mark.parametrize("kill", list(KILLS))
@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_and_resume_is_bit_exact(tmp_path, reference, method, kill):
    extra = METHODS[method]
    expected = reference(method)
    out = tmp_path / kill
    crashed = _train(tmp_path, out, extra, fault=KILLS[kill])
    assert crashed.returncode == -signal.SIGKILL, (kill, crashed.returncode, crashed.stderr[-2000:])
    assert not (out / "run" / "student_last.pt").exists()
    resumed = _train(tmp_path, out, extra, resume=True)
    assert resumed.returncode == 0, (kill, resumed.stderr[-2000:])
    if kill == "during_save":
        assert "skipping checkpoint" in resumed.stderr
    _assert_same(expected, _outcome(out / "run"), kill)


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + MARGIN_S)
@pytest.mark.parametrize("sig", ["TERM", "USR1", "INT"])
def test_stop_signal_checkpoints_the_current_step_and_resume_is_bit_exact(tmp_path, reference, sig):
    """SIGTERM (a cluster stopping the job), SIGUSR1 (SLURM's early warning) or Ctrl-C after the 3rd step:
    the process saves that step (between the interval checkpoints of steps 2 and 4), exits 128 + signal."""
    extra = METHODS["crd"]
    expected = reference("crd")
    stopped = _train(tmp_path, tmp_path / "stop", extra, fault=f"point=step,count=3,signal={sig}")
    signum = getattr(signal, "SIG" + sig)
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert f"stopped by SIG{sig} at stage 'main', epoch 1, step 3 of the epoch" in stopped.stderr
    run_dir = tmp_path / "stop" / "run"
    newest = checkpoint_io.list_checkpoints(run_dir)[-1]
    assert (newest.epoch, newest.step) == (1, 3) and not (run_dir / "student_last.pt").exists()
    resumed = _train(tmp_path, tmp_path / "stop", extra, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(expected, _outcome(run_dir), sig)


@pytest.mark.slow
def test_torchrun_stop_signal_stops_every_process_at_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM after its 2nd step; both processes agree at the next log step (the
    config logs every step) and stop there, with one checkpoint, instead of rank 0 hanging."""
    env = {k: v for k, v in os.environ.items() if k != "KDZOO_FAULT"} | {"OMP_NUM_THREADS": "1"}
    env["KDZOO_FAULT"] = "point=step,count=2,rank=1,signal=TERM"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdzoo",
           "train", str(_config(tmp_path)), f"experiment.output_dir={tmp_path / 'out'}", "method.name=kd"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode != 0 and "SIGABRT" not in result.stderr, result.stderr[-3000:]  # no gloo abort
    stops = re.findall(r"stopped by (\w+) at stage 'main', epoch (\d+), step (\d+)", result.stderr)
    assert stops == [("SIGTERM", "1", "2")] * 2, result.stderr[-3000:]
    # torchrun's table of the workers' exit codes. The first process to leave makes torchrun SIGTERM the
    # other, which has checkpointed already and ignores it on the stop path (run.py): both exit with 143.
    exit_codes = [int(code) for code in re.findall(r"exitcode  : (-?\d+)", result.stderr)]
    assert exit_codes == [143, 143], result.stderr[-3000:]
    newest = checkpoint_io.list_checkpoints(tmp_path / "out" / "run")[-1]
    assert (newest.epoch, newest.step) == (1, 2)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + MARGIN_S)
def test_torchrun_restarts_a_killed_worker_and_resumes(tmp_path):
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed once mid-run; the restarted group resumes by
    itself (resume=auto) and finishes with the same result as a run that was never interrupted."""
    def launch(out: Path, fault: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "KDZOO_FAULT"} | {"OMP_NUM_THREADS": "1"}
        if fault:
            env["KDZOO_FAULT"] = fault
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "-m", "kdzoo", "train", str(_config(tmp_path)),
               f"experiment.output_dir={out}", "method.name=kd", "runtime.deterministic=false", "resume=auto"]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    ref = launch(tmp_path / "ref", None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    marker = tmp_path / "killed_once"
    crashed = launch(tmp_path / "crash", f"point=step,count=3,rank=1,once={marker}")
    assert marker.exists() and crashed.returncode == 0, crashed.stderr[-3000:]
    expected, got = _outcome(tmp_path / "ref" / "run"), _outcome(tmp_path / "crash" / "run")
    _assert_same(expected[0], got[0], "student")
    _assert_same(expected[1], got[1], "metrics")

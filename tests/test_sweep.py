"""``kdzoo sweep``: every cell validated before anything is written, an interrupted sweep continues where it
stopped (finished cells untouched, the interrupted one resumed from its checkpoint), a failed cell does not stop
the others, and the SLURM path runs through submitit (its local executor) with a pre-emption and requeue."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from submitit.slurm.slurm import _make_sbatch_string

import kdzoo
from kdzoo.cli import main
from kdzoo.engine import checkpoint_io, faults
from kdzoo.report import run_complete
from kdzoo.sweep import available_cores, slurm_executor
from kdzoo.sweep_spec import build_cells, cell_names, load_spec

METHODS = ["vanilla", "kd", "dkd"]
SEEDS = [1, 2, 3]
STEPS_PER_EPOCH = 2  # data.subset 64 / batch 32


def _write_base(root: Path, threads: int | None = 1, **extra: dict) -> Path:
    torch.manual_seed(123)
    teacher = root / "teacher.pth"
    torch.save({"model": kdzoo.create_model("resnet8", num_classes=10).state_dict(), "epoch": 240}, teacher)
    runtime = {"device": "cpu", "progress": False, "tensorboard": False, "log_interval": 2}
    if threads is not None:
        runtime["threads"] = threads
    recipe = {
        "data": {"dataset": "mnist5k", "batch_size": 32, "subset": 64, "test_subset": 64, "test_batch_size": 64},
        "teacher": {"name": "resnet8", "checkpoint": str(teacher)},
        "student": {"name": "resnet8"},
        "method": {"name": "vanilla"},
        "schedule": {"epochs": 2, "milestones": [1]},
        "runtime": runtime,
        "published": {"top1": 20.0, "source": "this test"},
        **extra,
    }
    path = root / "recipes" / "base.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _write_spec(root: Path, name: str = "grid", **fields) -> Path:
    spec = {"name": name, "output_dir": str(root / "sweeps"), "base": "recipes/base.yaml",
            "grid": {"method.name": METHODS, "experiment.seed": SEEDS}, **fields}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _manifest(sweep_dir: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((sweep_dir / "manifest.json").read_text())["cells"]}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("methods", "seeds"),
    [(["vanilla", "kd"], [1, 2]), pytest.param(METHODS, SEEDS, marks=pytest.mark.slow, id="3-methods-3-seeds")],
)
def test_interrupted_sweep_continues_with_only_the_missing_cells_then_reports(tmp_path, monkeypatch, capsys,
                                                                            methods, seeds):
    """A Ctrl-C in the first KD cell's 2nd epoch (kdzoo's fault injection sends the SIGINT): the vanilla cells
    done, that cell checkpointed mid-epoch, the rest never started. The same command then runs only the missing
    ones, that one from its checkpoint, and `kdzoo report` prints numpy's mean ± sample std of the records."""
    _write_base(tmp_path)
    spec = _write_spec(tmp_path, grid={"method.name": methods, "experiment.seed": seeds})
    sweep_dir = tmp_path / "sweeps" / "grid"
    interrupted_cell, done_before = "method-kd_seed-1", len(seeds)
    cells_total = len(methods) * len(seeds)
    monkeypatch.setattr(faults, "_hits", Counter())
    steps_before = done_before * 2 * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 1
    monkeypatch.setenv("KDZOO_FAULT", f"point=step,count={steps_before},signal=INT,once={tmp_path / 'fired'}")
    assert main(["sweep", str(spec)]) == 130
    first = _manifest(sweep_dir)
    statuses = ["done"] * done_before + ["failed"] + ["pending"] * (cells_total - done_before - 1)
    assert [c["status"] for c in first.values()] == statuses
    assert first[interrupted_cell]["error"] == ("stopped by SIGINT, with a checkpoint: running the sweep again resumes "
                                                "this cell")
    assert "kdzoo: sweep stopped by SIGINT" in capsys.readouterr().err
    interrupted = sweep_dir / interrupted_cell
    assert (interrupted / checkpoint_io.checkpoint_name(0, 2, 1)).is_file()  # the stop's own checkpoint
    epoch_one = _records(interrupted)
    assert len(epoch_one) == 1 and not run_complete(interrupted)
    finished = {name: (sweep_dir / name / "student_last.pt").stat().st_mtime_ns
                for name, cell in first.items() if cell["status"] == "done"}
    assert not (sweep_dir / f"method-{methods[-1]}_seed-{seeds[-1]}" / "metrics.jsonl").exists()

    monkeypatch.delenv("KDZOO_FAULT")
    assert main(["sweep", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert f"{cells_total} cells, {done_before} done already, running {cells_total - done_before}" in printed
    second = _manifest(sweep_dir)
    assert all(c["status"] == "done" and c["error"] is None for c in second.values())
    # Finished cells were not run again; the interrupted one ran twice, its first epoch kept from the first run
    # (a fresh start would have re-timed it); the rest ran once.
    assert {name: (sweep_dir / name / "student_last.pt").stat().st_mtime_ns for name in finished} == finished
    assert {name: c["attempts"] for name, c in second.items()} == {
        name: 2 if name == interrupted_cell else 1 for name in second}
    resumed = _records(interrupted)
    assert len(resumed) == 2 and resumed[0] == epoch_one[0]
    assert all(run_complete(sweep_dir / name) for name in second)

    # The report, against numpy on the records themselves.
    last = {m: [_records(sweep_dir / f"method-{m}_seed-{s}")[-1]["top1"] for s in seeds] for m in methods}
    best = {m: [max(r["top1"] for r in _records(sweep_dir / f"method-{m}_seed-{s}")) for s in seeds] for m in methods}
    assert main(["report", str(sweep_dir)]) == 0
    markdown = capsys.readouterr().out
    for method in methods:
        mean, std = np.mean(last[method]), np.std(last[method], ddof=1)
        best_mean, best_std = np.mean(best[method]), np.std(best[method], ddof=1)
        row = next(line for line in markdown.splitlines() if f"| {method} |" in line)
        assert f"| {len(seeds)} | {mean:.2f} ± {std:.2f} | {best_mean:.2f} ± {best_std:.2f} |" in row
    assert "incomplete" not in markdown
    # vanilla keeps the base recipe's published value; kd and dkd replace its method, so not its result.
    vanilla_row = next(line for line in markdown.splitlines() if "| vanilla |" in line)
    assert vanilla_row.startswith(f"| resnet8 | vanilla | {len(seeds)} |")
    assert f"| 20.00 | {np.mean(last['vanilla']) - 20:+.2f} | — |" in vanilla_row
    kd_row = next(line for line in markdown.splitlines() if "| kd |" in line)
    gain = np.mean(last["kd"]) - np.mean(last["vanilla"])
    assert kd_row.startswith("| resnet8 → resnet8 | kd |") and f"| — | — | {gain:+.2f} |" in kd_row

    assert main(["report", str(sweep_dir), "--format", "csv"]) == 0
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    for method in methods:
        assert float(rows[method]["last_mean"]) == pytest.approx(np.mean(last[method]), abs=1e-12)
        assert float(rows[method]["last_std"]) == pytest.approx(np.std(last[method], ddof=1), abs=1e-12)
    gain = float(rows["kd"]["gain_vs_vanilla"])
    assert gain == pytest.approx(np.mean(last["kd"]) - np.mean(last["vanilla"]), abs=1e-12)
    assert main(["report", str(sweep_dir), "--format", "latex", "--output", str(tmp_path / "t.tex"),
                 "--plot", str(tmp_path / "fig.png")]) == 0
    assert "\\toprule" in (tmp_path / "t.tex").read_text()
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_cell_does_not_stop_the_others_and_is_named(tmp_path, capsys):
    _write_base(tmp_path)
    spec = _write_spec(tmp_path, "fail", grid={"method.name": ["kd"]},
                       cells=[{}, {"teacher.checkpoint": "missing.pth"}], overrides={"schedule.epochs": 1})
    assert main(["sweep", str(spec)]) == 1
    err = capsys.readouterr().err
    cells = _manifest(tmp_path / "sweeps" / "fail")
    assert list(cells) == ["method-kd", "checkpoint-missing.pth_method-kd"]
    assert cells["method-kd"]["status"] == "done"
    failed = cells["checkpoint-missing.pth_method-kd"]
    assert failed["status"] == "failed" and "teacher checkpoint missing.pth does not exist" in failed["error"]
    assert "1 of 2 cells failed" in err
    assert "checkpoint-missing.pth_method-kd: UserInputError: teacher checkpoint" in err
    # A cell that trained must not continue under a changed recipe.
    spec.write_text(spec.read_text().replace("schedule.epochs: 1", "schedule.epochs: 3"))
    assert main(["sweep", str(spec)]) == 2
    assert "sweep cell method-kd was trained with a different recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grdi": {}}, "unknown config key 'grdi'. Did you mean 'grid'?"),
        ({"executor": {"concurent": 2}}, "unknown config key 'executor.concurent'. Did you mean 'concurrent'?"),
        ({"executor": {"name": "sge"}}, "executor.name must be local or slurm"),
        ({"grid": {"optim.lrr": [0.1]}}, "sweep cell lrr-0.1: unknown config key 'optim.lrr'. Did you mean 'lr'?"),
        ({"grid": {"method.name": ["vanilla", "kdd"]}}, "sweep cell method-kdd: unknown method 'kdd'"),
        ({"grid": {"experiment.name": ["a"]}}, "experiment.name is set by the sweep for every cell"),
        ({"base": "recipes/nope.yaml"}, "base recipe recipes/nope.yaml not found"),
        ({"grid": {"experiment.seed": []}}, "grid.experiment.seed needs at least one value"),
    ],
)
def test_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys, fields, message):
    _write_base(tmp_path)
    spec = _write_spec(tmp_path, **fields)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kdzoo: error:") and err.count("\n") == 1
    assert not (tmp_path / "sweeps").exists()


def test_dry_run_lists_the_cells_and_writes_nothing(tmp_path, capsys):
    _write_base(tmp_path)
    spec = _write_spec(tmp_path)
    assert main(["sweep", str(spec), "--dry-run", "--executor", "slurm"]) == 0
    printed = capsys.readouterr().out
    assert "9 cells" in printed and "9 to run (slurm)" in printed
    assert "  method-dkd_seed-3      new     method.name=dkd experiment.seed=3\n" in printed
    assert not (tmp_path / "sweeps").exists()


def test_cell_names_are_readable_and_unique():
    names = cell_names([{"method.name": "kd", "experiment.seed": 1}, {"optim.lr": 0.05, "data.dataset": "cifar100"},
                        {"teacher.checkpoint": "a/b c.pth"}, {}, {"base": "configs/cifar100/kd/r32x4_r8x4.yaml"}])
    assert names == ["method-kd_seed-1", "lr-0.05_dataset-cifar100", "checkpoint-a-b-c.pth", "default",
                     "kd-r32x4-r8x4"]
    # Names that would collide, or run long, get a hash of their overrides (the same every time).
    clashing = cell_names([{"teacher.checkpoint": "a"}, {"student.checkpoint": "a"}, {"x.y": "z" * 100}])
    assert clashing == cell_names([{"teacher.checkpoint": "a"}, {"student.checkpoint": "a"}, {"x.y": "z" * 100}])
    assert clashing[0].startswith("checkpoint-a-") and clashing[0] != clashing[1] and len(clashing[2]) <= 80


def test_a_changed_method_drops_the_base_methods_parameters_and_published_result(tmp_path):
    _write_base(tmp_path, method={"name": "kd", "temperature": 8.0})
    spec = load_spec(_write_spec(tmp_path, grid={"method.name": ["kd", "dkd"]},
                                 cells=[{"base": "recipes/base.yaml", "method.ce_weight": 0.5}]))
    kd, dkd = build_cells(spec, tmp_path)
    assert kd.name == "recipes-base_ce_weight-0.5_method-kd"
    assert kd.recipe["method"] == {"name": "kd", "temperature": 8.0, "ce_weight": 0.5}
    assert kd.recipe["published"]["top1"] == 20.0
    assert dkd.recipe["method"] == {"name": "dkd", "ce_weight": 0.5} and "published" not in dkd.recipe
    assert dkd.recipe["experiment"] == {"output_dir": str(tmp_path / "sweeps" / "grid"), "name": dkd.name}


def test_train_prints_a_final_summary_line(tmp_path, capsys):
    base = _write_base(tmp_path)
    out = tmp_path / "runs"
    assert main(["train", str(base), f"experiment.output_dir={out}", "schedule.epochs=1"]) == 0
    record = _records(out / "run")[-1]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    scores = f"top1 last {record['top1']:.2f} (epoch 1), best {record['top1']:.2f} (epoch 1)"
    assert line.startswith("done in ") and line.endswith(f" s: {scores}; run directory: {out / 'run'}")


def test_slurm_path_in_process_with_submitits_debug_executor(tmp_path, capsys):
    _write_base(tmp_path)
    spec = _write_spec(tmp_path, "debug", grid={"method.name": ["vanilla", "dkd"]}, overrides={"schedule.epochs": 1},
                       executor={"name": "slurm", "cluster": "debug"})
    assert main(["sweep", str(spec)]) == 0
    cells = _manifest(tmp_path / "sweeps" / "debug")
    assert [c["status"] for c in cells.values()] == ["done", "done"]
    assert all(c["job_id"].startswith("DEBUG_") for c in cells.values())
    assert "all 2 cells done" in capsys.readouterr().out


def test_slurm_job_array_script_warns_with_usr1_and_names_the_resources(tmp_path, monkeypatch, capsys):
    _write_base(tmp_path)
    spec_path = _write_spec(tmp_path, "gpu", executor={
        "name": "slurm", "partition": "gpu", "time_min": 240, "cpus_per_task": 8, "array_parallelism": 4,
        "setup": ["module load cuda"], "additional_parameters": {"account": "proj"}})
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here: refused before anything is written
    assert main(["sweep", str(spec_path)]) == 2
    assert "srun is not on PATH" in capsys.readouterr().err and not (tmp_path / "sweeps").exists()
    # On a login node (a stand-in srun on PATH), the job array's sbatch script:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    executor = slurm_executor(load_spec(spec_path), tmp_path / "submitit")
    script = _make_sbatch_string(command="python -m submitit.core._submit", folder=executor.folder, map_count=9,
                                 **executor.parameters)
    for line in ("#SBATCH --signal=USR1@120", "#SBATCH --array=0-8%4", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8", "#SBATCH --time=240",
                 "#SBATCH --account=proj", "#SBATCH --job-name=gpu", "module load cuda",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1"):
        assert f"\n{line}\n" in script


@pytest.mark.slow
def test_concurrent_local_cells_run_as_subprocesses_sharing_the_cores(tmp_path, capsys):
    _write_base(tmp_path, threads=None)
    spec = _write_spec(tmp_path, "two", grid={"method.name": ["vanilla", "kd"]}, overrides={"schedule.epochs": 1},
                       executor={"concurrent": 2})
    assert main(["sweep", str(spec)]) == 0
    for name in ("method-vanilla", "method-kd"):
        run_dir = tmp_path / "sweeps" / "two" / name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["runtime"]["threads"] == max(
            1, available_cores() // 2)
        record = _records(run_dir)[-1]
        assert f"top1 last {record['top1']:.2f} (epoch 1)" in (run_dir / "sweep.log").read_text()


@pytest.mark.slow
def test_slurm_path_through_submitits_local_executor_requeues_a_preempted_cell(tmp_path, monkeypatch, capsys):
    """USR1 (SLURM's warning before the time limit) in one cell's 2nd epoch: kdzoo checkpoints at that step,
    submitit requeues the job, the requeued job resumes and finishes."""
    _write_base(tmp_path)
    spec = _write_spec(tmp_path, "slurm", grid={"method.name": ["vanilla", "kd"]},
                       executor={"name": "slurm", "cluster": "local", "time_min": 10})
    monkeypatch.setenv("KDZOO_FAULT", f"point=step,count={STEPS_PER_EPOCH + 1},signal=USR1,once={tmp_path / 'fired'}")
    assert main(["sweep", str(spec)]) == 0
    sweep_dir = tmp_path / "sweeps" / "slurm"
    cells = _manifest(sweep_dir)
    assert [c["status"] for c in cells.values()] == ["done", "done"]
    preempted = [name for name in cells if (sweep_dir / name / checkpoint_io.checkpoint_name(0, 2, 1)).is_file()]
    assert len(preempted) == 1 and (tmp_path / "fired").is_file()
    assert [r["epoch"] for r in _records(sweep_dir / preempted[0])] == [1, 2]
    logs = "".join(p.read_text() for p in (sweep_dir / "submitit").glob("*_log.*"))
    assert "Caught signal SIGUSR1" in logs and "Requeued job" in logs

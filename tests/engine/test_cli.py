"""The command line: exit code 2 with a one-paragraph message and nothing written for bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kdzoo
from kdzoo.bench import time_alternating
from kdzoo.cli import main
from tests.conftest import REPO_ROOT

KD_RECIPE = str(REPO_ROOT / "configs" / "cifar100" / "kd" / "resnet32x4_resnet8x4.yaml")


def _teacher(tmp_path: Path, arch: str = "resnet8", classes: int = 100) -> str:
    path = tmp_path / f"{arch}_teacher.pth"
    torch.save({"model": kdzoo.create_model(arch, num_classes=classes).state_dict(), "epoch": 240}, path)
    return str(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'. Did you mean 'lr'?"),
        (["runtime.amp=maybe"], "runtime.amp"),
        (["method.name=fitnett"], "unknown method 'fitnett'"),
        (["student.name=resnet9"], "unknown model 'resnet9'"),
        (["data.dataset=cifar1000"], "unknown dataset 'cifar1000'"),
        (["teacher.checkpoint=MISSING.pth"], "teacher checkpoint MISSING.pth does not exist"),
        (["data.root=NO_SUCH_DIR"], "cifar100 not found"),
        (["runtime.device=cuda:7"], "runtime.device=cuda:7"),
    ],
)
def test_train_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, data_root, extra, message):
    out = tmp_path / "runs"
    code = main(["train", KD_RECIPE, f"data.root={data_root}", f"experiment.output_dir={out}", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith("kdzoo: error:") and err.count("\n") == 1
    assert not out.exists()


def test_mismatched_teacher_checkpoint_exits_2(tmp_path, capsys, data_root):
    out = tmp_path / "runs"
    ckpt = _teacher(tmp_path, "resnet20")  # a resnet20 file given for a resnet32x4 teacher
    code = main(["train", KD_RECIPE, f"data.root={data_root}", f"experiment.output_dir={out}",
                 f"teacher.checkpoint={ckpt}"])
    err = capsys.readouterr().err
    assert code == 2 and "resnet20" in err
    assert not out.exists()


def test_train_then_eval_on_cifar100(tmp_path, capsys, data_root):
    out = tmp_path / "runs"
    code = main(["train", KD_RECIPE, f"data.root={data_root}", f"experiment.output_dir={out}",
                 "schedule.epochs=1", "data.subset=256", "data.test_subset=256", "teacher.name=resnet8",
                 f"teacher.checkpoint={_teacher(tmp_path)}", "student.name=resnet8", "runtime.progress=false"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    run_dir = out / "kd_resnet32x4_resnet8x4"
    assert f"run directory: {run_dir}" in printed
    code = main(["eval", "--model", "resnet8", "--checkpoint", str(run_dir / "student_last.pt"),
                 f"data.root={data_root}", "data.test_subset=256"])
    assert code == 0
    line = capsys.readouterr().out
    import json

    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"top-1 {last['top1']:.2f}" in line and f"top-5 {last['top5']:.2f}" in line


def test_list(capsys):
    assert main(["list", "methods"]) == 0
    methods = capsys.readouterr().out
    assert "kd " in methods and "dkd " in methods and "vanilla " in methods
    assert main(["list", "models"]) == 0
    models = capsys.readouterr().out
    assert "resnet32x4" in models and "7,433,860" in models
    assert main(["list", "configs"]) == 0
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml" in capsys.readouterr().out


def test_simkd_export_evaluates_like_in_training(tmp_path, capsys):
    """SimKD's deployed model is student backbone + projector + teacher classifier; kdzoo eval rebuilds it."""
    out = tmp_path / "runs"
    teacher = tmp_path / "t.pth"
    torch.save(kdzoo.create_model("resnet20", num_classes=10).state_dict(), teacher)  # a plain state_dict
    config = tmp_path / "simkd.yaml"
    config.write_text(
        "experiment: {name: simkd}\ndata: {dataset: mnist5k, batch_size: 32, subset: 256, test_subset: 200}\n"
        f"teacher: {{name: resnet20, checkpoint: {teacher}}}\nstudent: {{name: resnet8}}\n"
        "method: {name: simkd}\nschedule: {epochs: 1}\nruntime: {device: cpu, progress: false, tensorboard: false}\n"
    )
    assert main(["train", str(config), f"experiment.output_dir={out}"]) == 0
    capsys.readouterr()
    import json

    record = json.loads((out / "simkd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["eval", "--checkpoint", str(out / "simkd" / "student_last.pt"), "data.dataset=mnist5k",
                 "data.test_subset=200"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {record['top1']:.2f}" in printed and f"loss {record['loss']:.4f}" in printed


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch kdzoo_exploit_ran",))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "is unreadable or corrupt"),
        ("exploit", "refuses to unpickle it"),
        ("fsp_channels", "fsp needs the same channel count"),
        ("simkd_classifier", "simkd feeds the projected last feature map"),
        ("not_a_checkpoint", "is unreadable or corrupt"),
    ],
)
def test_bad_files_and_incompatible_pairs_exit_2(tmp_path, capsys, data_root, monkeypatch, case, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    args = [f"data.root={data_root}", f"experiment.output_dir={out}"]
    if case == "truncated":
        good = Path(_teacher(tmp_path, "resnet32x4"))
        bad = tmp_path / "truncated.pth"
        bad.write_bytes(good.read_bytes()[:4096])
        args.append(f"teacher.checkpoint={bad}")
    elif case == "exploit":
        bad = tmp_path / "exploit.pth"
        torch.save({"model": _Exploit()}, bad)
        args.append(f"teacher.checkpoint={bad}")
    elif case == "not_a_checkpoint":
        bad = tmp_path / "notes.pth"
        bad.write_text("these are not weights")
        args.append(f"teacher.checkpoint={bad}")
    elif case == "fsp_channels":  # FSP needs equal stage widths; ShuffleV2's differ from resnet32x4's
        args += ["method.name=fsp", "student.name=ShuffleV2", f"teacher.checkpoint={_teacher(tmp_path, 'resnet32x4')}"]
    else:  # SimKD reuses the teacher's classifier; ShuffleV2's head does not take the projected map
        args += ["method.name=simkd", "teacher.name=ShuffleV2", f"teacher.checkpoint={_teacher(tmp_path, 'ShuffleV2')}"]
    code = main(["train", KD_RECIPE, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not (tmp_path / "kdzoo_exploit_ran").exists()


def test_bench_prints_floor_methods_and_epoch(tmp_path, capsys, data_root):
    code = main(["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch-size", "4", "--steps", "2",
                 "--warmup", "0", "--methods", "kd,fitnet", "--with-cache", "--epoch-samples", "16",
                 "--data-root", str(data_root), "--output-dir", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    assert rows["floor (teacher fwd + student step)"][5].strip() == "1.00"
    assert {"student only", "kd", "kd + teacher cache", "fitnet"} <= set(rows)
    assert "fitnet + teacher cache" not in rows  # feature methods need the live teacher
    # FitNet ConvReg on resnet8 hint layer 2 (32 channels): 1x1 conv 32*32 + bias 32 + BatchNorm 2*32.
    assert rows["fitnet"][9].strip() == "1,120"
    # Counted FLOPs: KD adds no matmul/conv work to the floor, FitNet its regressor. Teacher = student
    # here, so the student alone is forward + backward (about 3 forwards) of the floor's 4.
    flop_ratio = {name: float(rows[name][7]) for name in ("kd", "fitnet", "student only")}
    assert flop_ratio["kd"] == 1.0 and flop_ratio["fitnet"] > 1.0
    assert flop_ratio["student only"] == pytest.approx(0.75, abs=0.01)
    epoch = next(name for name in rows if name.startswith("kd: full epoch, 16 images"))
    assert "(4 steps)" in epoch and float(rows[epoch][2]) > 0


def test_alternating_timing_interleaves_the_two_steps():
    calls = []
    step_times, floor_times = time_alternating(lambda: calls.append("step"), lambda: calls.append("floor"),
                                               torch.device("cpu"), warmup=1, steps=3)
    # Warm-up pair, then step/floor alternating with the leader swapped every pair: neither side always runs first.
    assert calls == ["floor", "step", "step", "floor", "floor", "step", "step", "floor"]
    assert len(step_times) == len(floor_times) == 3 and min(step_times + floor_times) >= 0


def test_bench_paired_adds_the_ratio_to_the_alternated_floor(capsys):
    code = main(["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch-size", "4", "--steps", "2",
                 "--warmup", "0", "--methods", "kd,fitnet", "--paired"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| step"))
    assert header.split("|")[11:13] == [" × paired floor ", " paired time / FLOPs "]
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith("| ")}
    assert rows["floor (teacher fwd + student step)"][11].strip() == "-"  # the floor is not paired with itself
    for name in ("kd", "fitnet"):
        paired_ratio, flop_ratio = float(rows[name][11]), float(rows[name][7])
        assert paired_ratio > 0 and float(rows[name][12]) == pytest.approx(paired_ratio / flop_ratio, abs=0.011)


def test_bench_channels_last_converts_everything(capsys, monkeypatch):
    import kdzoo.bench

    layouts = []  # for every timed network forward (batch 4; build-time shape probes use 2): channels_last?

    def recording_model(*args, **kwargs):
        model = kdzoo.create_model(*args, **kwargs)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        def record(_, inputs) -> None:  # returns None: the input is left as it is
            if inputs[0].shape[0] == 4:
                layouts.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                                conv.weight.is_contiguous(memory_format=torch.channels_last)))

        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(kdzoo.bench, "create_model", recording_model)
    code = main(["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch-size", "4", "--steps", "1",
                 "--warmup", "0", "--methods", "kd,reviewkd", "--channels-last"])
    assert code == 0
    table = capsys.readouterr().out
    assert "batch 4, 32x32, cpu, channels_last," in table.splitlines()[0]
    assert layouts and all(inp and weight for inp, weight in layouts)
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    assert {"kd", "reviewkd"} <= set(rows)


def test_bench_segmentation_times_the_dense_methods_against_their_floor(capsys):
    """``--task segmentation``: dense pair, per-pixel labels, only the methods declaring the task."""
    code = main(["bench", "--task", "segmentation", "--teacher", "deeplabv3plus_resnet18", "--student",
                 "deeplabv3plus_mobilenetv2", "--batch-size", "2", "--image-size", "33", "--steps", "1",
                 "--warmup", "0"])
    assert code == 0
    table = capsys.readouterr().out
    assert "segmentation, deeplabv3plus_resnet18 -> deeplabv3plus_mobilenetv2, batch 2, 33x33" in table
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| ")}
    assert {"vanilla", "ofd", "cwd", "pixel_kd", "fitnet", "at"} <= set(rows)
    assert not {"kd", "dkd", "crd"} & set(rows)  # classification-only methods are left out
    # CWD and pixel KD read maps the forward computes anyway: no FLOPs beyond the floor; OFD adds its connectors.
    assert float(rows["cwd"][7]) == 1.0 and float(rows["pixel_kd"][7]) == 1.0 and float(rows["ofd"][7]) > 1.0

"""``kdzoo export``: every format gives the PyTorch model's logits (ONNX through onnxruntime within 1e-4, TorchScript
within 1e-6, safetensors bit for bit), SimKD's composite included; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kdzoo
from kdzoo.cli import main
from kdzoo.config.loader import load_config, to_yaml
from kdzoo.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from kdzoo.engine.checkpoint_io import load_verified, save_checkpoint
from kdzoo.engine.run import run_training
from kdzoo.engine.setup import load_model_for_eval
from kdzoo.export import load_safetensors

onnxruntime = pytest.importorskip("onnxruntime", reason="the ONNX checks need the 'export' extra")
onnx = pytest.importorskip("onnx", reason="the ONNX checks need the 'export' extra")

MNIST_MEAN, MNIST_STD = [0.1307] * 3, [0.3081] * 3  # the standard MNIST statistics, repeated to 3 channels


def _save_export(path: Path, name: str, num_classes: int, seed: int, **model_args) -> dict[str, torch.Tensor]:
    """A student file as Trainer.export writes it, from a freshly initialised network."""
    torch.manual_seed(seed)
    model = kdzoo.create_model(name, num_classes=num_classes, **model_args)
    state = model.state_dict()
    save_checkpoint({"format": "kdzoo-model", "version": kdzoo.__version__, "model_name": name,
                     "model_args": model_args, "num_classes": num_classes, "model": state,
                     "metrics": {"epoch": 1, "top1": 12.5}}, path)
    return state


def _pytorch_model(checkpoint: Path, image_size: int = 32) -> torch.nn.Module:
    payload = load_verified(checkpoint)
    return load_model_for_eval(None, str(checkpoint), payload["num_classes"], (3, image_size, image_size)).eval()


def _onnx_opset(path: Path) -> int:
    return next(entry.version for entry in onnx.load(str(path)).opset_import if entry.domain in ("", "ai.onnx"))


def _batch(size: int = 32, batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """A resnet8x4 run directory: student_last.pt and the config.yaml training writes (CIFAR-100)."""
    run_dir = tmp_path_factory.mktemp("plain_run")
    _save_export(run_dir / "student_last.pt", "resnet8x4", 100, seed=0)
    cfg = load_config(None, ["method.name=vanilla", "student.name=resnet8x4", "data.dataset=cifar100"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


@pytest.fixture(scope="module")
def simkd_run(tmp_path_factory) -> Path:
    """A real one-epoch SimKD run on 64 mnist5k digits: its student_last.pt is the composite export."""
    root = tmp_path_factory.mktemp("simkd")
    teacher = root / "teacher.pth"
    torch.save(kdzoo.create_model("resnet20", num_classes=10).state_dict(), teacher)
    cfg = load_config(None, [
        "experiment.name=simkd", f"experiment.output_dir={root / 'runs'}", "data.dataset=mnist5k",
        "data.subset=64", "data.test_subset=64", "data.batch_size=32", "student.name=resnet8", "teacher.name=resnet20",
        f"teacher.checkpoint={teacher}", "method.name=simkd", "schedule.epochs=1", "runtime.device=cpu",
        "runtime.progress=false", "runtime.tensorboard=false", "runtime.threads=1"])
    return Path(run_training(cfg)["run_dir"])


def test_onnx_gives_the_pytorch_logits_with_a_dynamic_batch(plain_run, capsys):
    assert main(["export", str(plain_run), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {plain_run / 'student_last.pt'} to {plain_run / 'student_last.onnx'}" in printed
    session = onnxruntime.InferenceSession(str(plain_run / "student_last.onnx"), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and isinstance(images.shape[0], str) and images.shape[1:] == [3, 32, 32]
    model = _pytorch_model(plain_run / "student_last.pt")
    for batch in (1, 5):  # exported at batch 2: other batch sizes run too
        x = _batch(batch=batch)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == (batch, 100)
        assert np.abs(logits - expected).max() <= 1e-4
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["kdzoo"])
    assert metadata == json.loads((plain_run / "student_last.onnx.json").read_text())
    assert (metadata["model_name"], metadata["num_classes"], metadata["composite"]) == ("resnet8x4", 100, None)
    assert metadata["input"]["normalised"] is True
    assert metadata["input"]["mean"] == list(CIFAR100_MEAN) and metadata["input"]["std"] == list(CIFAR100_STD)
    assert metadata["onnx_opset"] == _onnx_opset(plain_run / "student_last.onnx")


def test_torchscript_gives_the_pytorch_logits(plain_run, tmp_path):
    output = tmp_path / "student.pt"
    assert main(["export", str(plain_run / "student_last.pt"), "--format", "torchscript", "--output",
                 str(output)]) == 0
    extra = {"kdzoo.json": ""}
    loaded = torch.jit.load(str(output), _extra_files=extra)
    x = _batch()
    with torch.no_grad():
        assert (loaded(x) - _pytorch_model(plain_run / "student_last.pt")(x)).abs().max() <= 1e-6
    metadata = json.loads(extra["kdzoo.json"])
    assert metadata == json.loads((tmp_path / "student.pt.json").read_text())
    assert metadata["model_name"] == "resnet8x4" and metadata["input"]["shape"] == ["batch", 3, 32, 32]


def test_safetensors_holds_the_state_dict_bit_for_bit_and_rebuilds(plain_run):
    assert main(["export", str(plain_run), "--format", "safetensors"]) == 0
    path = plain_run / "student_last.safetensors"
    state = load_file(str(path))
    original = load_verified(plain_run / "student_last.pt")["model"]
    assert state.keys() == original.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in original.items())
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["kdzoo"])
    assert metadata == json.loads((plain_run / "student_last.safetensors.json").read_text())
    # docs/export.md's recipe: the architecture from the metadata, the weights from the file.
    model = kdzoo.create_model(metadata["model_name"], num_classes=metadata["num_classes"], **metadata["model_args"])
    model.load_state_dict(state)
    x = _batch()
    with torch.no_grad():
        expected = _pytorch_model(plain_run / "student_last.pt")(x)
        assert torch.equal(model.eval()(x), expected)
        assert torch.equal(load_safetensors(path)(x), expected)


def test_safetensors_keeps_every_key_of_a_module_registered_twice(tmp_path):
    """DeepLabV3+'s MobileNetV2 backbone lists each early block under two names that share storage."""
    checkpoint = tmp_path / "student_last.pt"
    original = _save_export(checkpoint, "deeplabv3plus_mobilenetv2", 3, seed=0)
    assert torch.equal(original["backbone.features.0.0.weight"], original["backbone.low_level_features.0.0.weight"])
    assert main(["export", str(checkpoint), "--format", "safetensors", "--image-size", "33"]) == 0
    state = load_file(str(tmp_path / "student_last.safetensors"))
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    x = _batch(33, 2)
    with torch.no_grad():
        rebuilt = load_safetensors(tmp_path / "student_last.safetensors")
        assert torch.equal(rebuilt(x), _pytorch_model(checkpoint, 33)(x))


def test_a_run_directory_exports_its_best_student(tmp_path, capsys):
    best = _save_export(tmp_path / "student_best.pt", "resnet8", 10, seed=1)
    _save_export(tmp_path / "student_last.pt", "resnet8", 10, seed=2)
    assert main(["export", str(tmp_path), "--format", "safetensors"]) == 0
    assert f"exported {tmp_path / 'student_best.pt'} to" in capsys.readouterr().out
    state = load_file(str(tmp_path / "student_best.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in best.items())
    assert not (tmp_path / "student_last.safetensors").exists()
    # Without a config.yaml the CIFAR architecture's one input size is used and mean/std are unknown.
    metadata = json.loads((tmp_path / "student_best.safetensors.json").read_text())
    assert metadata["input"]["shape"] == ["batch", 3, 32, 32] and metadata["input"]["mean"] is None


def test_simkd_composite_exports_in_every_format(simkd_run):
    checkpoint = simkd_run / "student_last.pt"
    assert load_verified(checkpoint)["composite"]["method"] == "simkd"
    model = _pytorch_model(checkpoint)
    assert type(model).__name__ == "SimKDStudent"
    x = _batch()
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (5, 10)
    assert main(["export", str(checkpoint), "--format", "onnx", "--opset", "18"]) == 0
    assert _onnx_opset(simkd_run / "student_last.onnx") == 18
    for fmt in ("torchscript", "safetensors"):
        assert main(["export", str(checkpoint), "--format", fmt]) == 0
    session = onnxruntime.InferenceSession(str(simkd_run / "student_last.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() <= 1e-4
    with torch.no_grad():
        assert (torch.jit.load(str(simkd_run / "student_last.torchscript.pt"))(x) - expected).abs().max() <= 1e-6
        assert torch.equal(load_safetensors(simkd_run / "student_last.safetensors")(x), expected)
    state = load_file(str(simkd_run / "student_last.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in load_verified(checkpoint)["model"].items())
    assert any(k.startswith("projector.") for k in state) and any(k.startswith("classifier.") for k in state)
    metadata = json.loads((simkd_run / "student_last.onnx.json").read_text())
    assert metadata["composite"]["teacher_name"] == "resnet20" and metadata["composite"]["student_name"] == "resnet8"
    assert (metadata["input"]["mean"], metadata["input"]["std"]) == (MNIST_MEAN, MNIST_STD)


@pytest.mark.slow
def test_segmentation_onnx_takes_any_image_size(tmp_path):
    checkpoint = tmp_path / "student_last.pt"
    _save_export(checkpoint, "deeplabv3plus_resnet18", 3, seed=0)
    assert main(["export", str(checkpoint), "--format", "onnx", "--image-size", "33"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "student_last.onnx"), providers=["CPUExecutionProvider"])
    model = _pytorch_model(checkpoint, 33)
    x = torch.randn(2, 3, 49, 41, generator=torch.Generator().manual_seed(0))  # not the export size
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (2, 3, 49, 41)
    assert np.abs(logits - expected).max() <= 1e-4
    assert json.loads((tmp_path / "student_last.onnx.json").read_text())["task"] == "segmentation"


@pytest.mark.slow
def test_detector_exports_to_torchscript_and_safetensors_not_onnx(tmp_path, capsys):
    checkpoint = tmp_path / "student_last.pt"
    _save_export(checkpoint, "fasterrcnn_mobilenet_v2_fpn", 3, seed=0, min_size=64, max_size=64)
    assert main(["export", str(checkpoint), "--format", "onnx", "--image-size", "64"]) == 2
    assert "does not export detectors to ONNX" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student_last.pt", "student_last.pt.sha256"]
    for fmt in ("torchscript", "safetensors"):
        assert main(["export", str(checkpoint), "--format", fmt, "--image-size", "64"]) == 0
    model = _pytorch_model(checkpoint, 64)
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        expected = model(images)
        _, scripted = torch.jit.load(str(tmp_path / "student_last.torchscript.pt"))(images)
        rebuilt = load_safetensors(tmp_path / "student_last.safetensors")(images)
    for want, got_scripted, got_rebuilt in zip(expected, scripted, rebuilt):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(got_scripted[key], want[key]) and torch.equal(got_rebuilt[key], want[key])
    metadata = json.loads((tmp_path / "student_last.safetensors.json").read_text())
    assert metadata["input"]["normalised"] is False and metadata["model_args"] == {"min_size": 64, "max_size": 64}


def _not_an_export(tmp_path: Path) -> list[str]:
    path = tmp_path / "plain.pth"
    torch.save(kdzoo.create_model("resnet8", num_classes=10).state_dict(), path)
    return [str(path), "--format", "onnx"]


def _training_checkpoint(tmp_path: Path) -> list[str]:
    save_checkpoint({"format": "kdzoo-train-state", "model": {}}, tmp_path / "ckpt_0_e0001_s000002.pt")
    return [str(tmp_path / "ckpt_0_e0001_s000002.pt"), "--format", "torchscript"]


def _with_export(tmp_path: Path, *args: str) -> list[str]:
    _save_export(tmp_path / "student_last.pt", "resnet8", 10, seed=0)
    return [str(tmp_path), *args]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: [str(p / "no_such_run"), "--format", "onnx"], "no_such_run does not exist"),
        (lambda p: [str(p), "--format", "onnx"], "holds no exported student (student_best.pt or student_last.pt)"),
        (_not_an_export, "plain.pth is not a kdzoo student export (no plain.pth.sha256"),
        (_training_checkpoint, "is not a kdzoo student export (a training checkpoint"),
        (lambda p: _with_export(p, "--format", "tflite"),
         "unknown export format 'tflite'; choose one of onnx, torchscript, safetensors"),
        (lambda p: _with_export(p, "--format", "torchscript", "--opset", "17"), "--opset applies to --format onnx"),
        (lambda p: _with_export(p, "--format", "onnx", "--image-size", "64"), "expects 32x32 inputs"),
        (lambda p: _with_export(p, "--format", "onnx", "--output", str(p / "missing" / "m.onnx")),
         "output directory"),
        (lambda p: _with_export(p, "--format", "onnx", "--opset", "13"), "cannot write opset 13"),
        (lambda p: _with_export(p, "--format", "safetensors", "--output", str(p)), "is a directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, make_args, message):
    args = make_args(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdzoo: error:") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_an_unknown_input_size_asks_for_image_size(tmp_path, capsys):
    _save_export(tmp_path / "student_last.pt", "deeplabv3plus_resnet18", 3, seed=0)
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    assert "pass --image-size N" in capsys.readouterr().err
    assert not (tmp_path / "student_last.torchscript.pt").exists()

"""Checkpoint formats of RepDistiller, mdistiller, SimKD, OFD and kdzoo; safety; mismatch diagnostics."""

from __future__ import annotations

import argparse
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from kdzoo.errors import CheckpointError
from kdzoo.models import create_model, identify_architecture, load_checkpoint


@pytest.fixture(scope="module")
def weights(load_golden) -> dict[str, OrderedDict[str, torch.Tensor]]:
    """Golden seeded weights of a student (resnet8x4) and a teacher (wrn_16_2)."""
    return {name: load_golden(name)["state_dict"] for name in ("resnet8x4", "wrn_16_2")}


@pytest.fixture(scope="module")
def inputs(load_golden) -> torch.Tensor:
    return load_golden("resnet8x4")["input"][:2]


def _logits(
    name: str, sd: OrderedDict[str, torch.Tensor] | None, x: torch.Tensor, path: Path | None = None, **kw
) -> torch.Tensor:
    model = create_model(name, num_classes=100)
    if path is None:
        model.load_state_dict(sd)
    else:
        load_checkpoint(model, path, **kw)
    model.eval()
    with torch.no_grad():
        return model(x)


def _save(obj: object, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **kw)
    return path


# --------------------------------------------------------------------------------------------------- formats


def test_repdistiller_periodic_checkpoint(tmp_path: Path, weights, inputs) -> None:
    sd = weights["resnet8x4"]
    optimizer = {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1]}]}
    path = _save(
        {"epoch": 240, "model": sd, "accuracy": torch.tensor(72.5), "optimizer": optimizer},
        tmp_path / "resnet8x4_vanilla" / "ckpt_epoch_240.pth",
    )
    model = create_model("resnet8x4", num_classes=100)
    meta = load_checkpoint(model, path)
    assert meta["epoch"] == 240 and meta["accuracy"] == pytest.approx(72.5)
    assert meta["format"] == "repdistiller" and "optimizer" not in meta
    assert torch.equal(_logits("resnet8x4", None, inputs, path), _logits("resnet8x4", sd, inputs))


def test_repdistiller_last_checkpoint_with_namespace(tmp_path: Path, weights, inputs) -> None:
    sd = weights["resnet8x4"]
    opt = argparse.Namespace(model="resnet8x4", learning_rate=0.05, epochs=240)
    path = _save({"opt": opt, "model": sd, "optimizer": {}}, tmp_path / "resnet8x4_last.pth")
    model = create_model("resnet8x4", num_classes=100)
    meta = load_checkpoint(model, path)
    assert meta["opt"] == vars(opt)
    assert torch.equal(_logits("resnet8x4", None, inputs, path), _logits("resnet8x4", sd, inputs))


def test_repdistiller_best_checkpoint_legacy_serialization(tmp_path: Path, weights, inputs) -> None:
    sd = weights["resnet8x4"]
    path = _save(
        {"epoch": 200, "model": sd, "best_acc": 73.1}, tmp_path / "best.pth", _use_new_zipfile_serialization=False
    )
    model = create_model("resnet8x4", num_classes=100)
    assert load_checkpoint(model, path)["best_acc"] == pytest.approx(73.1)
    assert torch.equal(_logits("resnet8x4", None, inputs, path), _logits("resnet8x4", sd, inputs))


def test_mdistiller_trainer_state_selects_side(tmp_path: Path, weights, inputs) -> None:
    student, teacher = weights["resnet8x4"], weights["wrn_16_2"]
    state = OrderedDict()
    for prefix, sd in (("module.student.", student), ("module.teacher.", teacher)):
        state.update((prefix + k, v) for k, v in sd.items())
    state["module.conv_reg.weight"] = torch.zeros(256, 128, 1, 1)  # a method module: dropped
    path = _save({"epoch": 12, "model": state, "optimizer": {}, "best_acc": 41.0}, tmp_path / "latest")
    meta = load_checkpoint(create_model("resnet8x4", num_classes=100), path)
    assert meta["format"] == "mdistiller_trainer" and meta["side"] == "student" and meta["epoch"] == 12
    assert torch.equal(_logits("resnet8x4", None, inputs, path), _logits("resnet8x4", student, inputs))
    assert torch.equal(_logits("wrn_16_2", None, inputs, path, side="teacher"), _logits("wrn_16_2", teacher, inputs))
    with pytest.raises(CheckpointError, match="resnet8x4"):  # the student file into the teacher's model
        load_checkpoint(create_model("wrn_16_2", num_classes=100), path)
    assert identify_architecture(state) == ["resnet8x4"]


def test_mdistiller_student_simkd_overhaul_plain_and_kdzoo_files(tmp_path: Path, weights, inputs) -> None:
    sd = weights["wrn_16_2"]
    expected = _logits("wrn_16_2", sd, inputs)
    proj = {"proj.0.weight": torch.ones(3, 3)}
    files = {
        "model_dict": {"model": sd},  # mdistiller student_best
        "simkd": {"epoch": 3, "model": sd, "best_acc": 70.0, "proj": proj},
        "overhaul": {"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())},
        "state_dict": sd,
        "kdzoo": {"kdzoo_format": 1, "model": sd, "epoch": 5},
    }
    for fmt, obj in files.items():
        path = _save(obj, tmp_path / f"{fmt}.pth")
        model = create_model("wrn_16_2", num_classes=100)
        meta = load_checkpoint(model, path)
        assert meta["format"] == fmt
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(inputs), expected), fmt
    assert torch.equal(
        load_checkpoint(create_model("wrn_16_2"), tmp_path / "simkd.pth")["proj"]["proj.0.weight"],
        proj["proj.0.weight"],
    )


def test_module_prefix_keeps_batchnorm_metadata(tmp_path: Path) -> None:
    """``_metadata`` (BN versions) survives stripping ``module.``: a current file lacking
    num_batches_tracked fails strictly, while a pre-0.4.1 file (no version) loads as torch allows."""
    wrapped = torch.nn.DataParallel(create_model("resnet8", num_classes=100))
    current = wrapped.state_dict()
    for key in [k for k in current if k.endswith("num_batches_tracked")]:
        del current[key]
    assert "module.bn1" in current._metadata
    path = _save({"state_dict": current}, tmp_path / "current.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): bn1\.num_batches_tracked"):
        load_checkpoint(create_model("resnet8", num_classes=100), path)
    old = OrderedDict(current.items())  # no _metadata, as in files written before BN versions existed
    path_old = _save({"state_dict": old}, tmp_path / "old.pth")
    model = create_model("resnet8", num_classes=100)
    load_checkpoint(model, path_old)
    assert torch.equal(model.conv1.weight, wrapped.module.conv1.weight)


# --------------------------------------------------------------------------------------------------- mismatches


def test_mismatched_checkpoint_names_keys_and_suggests_model(tmp_path: Path, weights) -> None:
    path = _save({"model": weights["resnet8x4"], "epoch": 1}, tmp_path / "resnet32x4_vanilla" / "ckpt_epoch_240.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(create_model("resnet32x4", num_classes=100), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing key(s): layer1.1.conv1.weight" in message and "more)" in message
    assert "'resnet8x4' (num_classes=100)" in message
    assert "folder name suggests 'resnet32x4'" in message


def test_width_variant_and_num_classes_are_identified(tmp_path: Path, weights) -> None:
    path = _save({"model": weights["wrn_16_2"]}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(create_model("wrn_16_4", num_classes=100), path)
    assert "shape mismatch" in str(info.value) and "'wrn_16_2' (num_classes=100)" in str(info.value)
    assert "wrn_16_4'" not in str(info.value).split("match the registered")[1]
    ten = create_model("resnet8x4", num_classes=10).state_dict()
    path10 = _save(ten, tmp_path / "ten.pth")
    with pytest.raises(
        CheckpointError, match=r"fc\.weight file \[10, 256\] vs model \[100, 256\].*'resnet8x4' \(num_classes=10\)"
    ):
        load_checkpoint(create_model("resnet8x4", num_classes=100), path10)


def test_identify_architecture_distinguishes_widths() -> None:
    cases = {
        "wrn_16_2": "wrn_16_4",
        "MobileNetV2": "MobileNetV2_1_0",
        "ShuffleV2": "ShuffleV2_1_5",
        "resnet14x2": "resnet14x4",
        "tv_resnet18": "ResNet18",
    }
    for name, other in cases.items():
        for candidate in (name, other):
            with torch.device("meta"):
                sd = create_model(candidate, num_classes=7).state_dict()
            assert identify_architecture(sd) == [candidate]
            assert identify_architecture(sd, with_num_classes=True) == [(candidate, 7)]
    assert identify_architecture({"x.weight": torch.zeros(1)}) == []


def test_non_strict_load_reports_what_did_not_fit(tmp_path: Path, weights) -> None:
    ten = create_model("resnet8x4", num_classes=10).state_dict()
    path = _save(ten, tmp_path / "ten.pth")
    model = create_model("resnet8x4", num_classes=100)
    meta = load_checkpoint(model, path, strict=False)
    assert meta["mismatched_keys"] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.conv1.weight, ten["conv1.weight"])


# --------------------------------------------------------------------------------------------------- safety


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "ckpt.pth"
    with pytest.raises(CheckpointError, match=f"{path} does not exist"):
        load_checkpoint(create_model("resnet8"), path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_are_refused(tmp_path: Path, weights, damage: str) -> None:
    good = io.BytesIO()
    torch.save({"model": weights["resnet8x4"]}, good)
    data = {
        "truncated": good.getvalue()[: len(good.getvalue()) // 2],
        "garbage": b"not a checkpoint" * 64,
        "empty": b"",
    }
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(data[damage])
    with pytest.raises(CheckpointError, match="unreadable or corrupt") as info:
        load_checkpoint(create_model("resnet8x4", num_classes=100), path)
    assert str(path) in str(info.value)


class _Exploit:
    """Unpickling this object would run ``exec`` and create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle_protocol2", "raw_pickle_protocol4"])
def test_code_executing_pickle_is_refused(tmp_path: Path, weights, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"x": _Exploit(marker), "model": weights["resnet8x4"]}  # the exploit is unpickled first
    path = tmp_path / "evil.pth"
    if writer == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(create_model("resnet8x4", num_classes=100), path)
    assert not marker.exists()
    assert str(path) in str(info.value)
    if writer != "raw_pickle_protocol4":  # protocol 4 already fails on its framing opcode
        assert "refuses to unpickle" in str(info.value) and "'exec'" in str(info.value)
    # The payload is real: unrestricted unpickling does run it.
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()

"""Regression tests of the code-health review's bugs: each failed before its fix.

0. CIFAR-100 normalisation constants (and ``data.mean`` / ``data.std``).
1. fp16 + ``runtime.nonfinite=skip``: the GradScaler sees every step, so an overflow backs the scale off.
2. DML ``update=alternating`` under DDP: gradients averaged across processes (``test_distributed.py``).
3. ``teacher.taps`` / ``student.taps`` exist, are validated, and a wrong path exits 2 naming it.
4. A ``method.stages`` override of FitNet's hint stage ``trainable`` takes effect.
5. SemCKD's batch width comes from ``data.batch_size``; every check runs before the run directory exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import kdzoo
from kdzoo.cli import main
from kdzoo.config.loader import config_from_dict
from kdzoo.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from kdzoo.data.datasets import build_data
from kdzoo.engine.setup import prepare_run
from kdzoo.engine.trainer import Trainer
from kdzoo.errors import UserInputError
from kdzoo.types import Batch, Progress


def _teacher_file(tmp_path: Path, arch: str = "resnet8", classes: int = 10) -> str:
    torch.manual_seed(123)
    path = tmp_path / f"{arch}_teacher.pth"
    torch.save({"model": kdzoo.create_model(arch, num_classes=classes).state_dict()}, path)
    return str(path)


def _raw(tmp_path: Path, method: dict, **sections) -> dict:
    raw = {
        "experiment": {"name": "run", "output_dir": str(tmp_path / "runs"), "seed": 1},
        "data": {"dataset": "mnist5k", "batch_size": 16, "subset": 64, "test_subset": 32},
        "teacher": {"name": "resnet8", "checkpoint": _teacher_file(tmp_path)},
        "student": {"name": "resnet8"},
        "method": method,
        "schedule": {"epochs": 1, "milestones": []},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _train_exits_2(tmp_path: Path, capsys, raw: dict, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "runs").exists(), "a run directory was written before validation finished"


# ---- 0. normalisation -------------------------------------------------------------------------------------------


def test_cifar100_normalisation_is_the_references():
    # RepDistiller / mdistiller / SimKD dataset/cifar100.py: the inputs their published teachers were trained on.
    assert CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
    assert CIFAR100_STD == (0.2675, 0.2565, 0.2761)


def test_cifar100_loader_uses_the_reference_constants(data_root):
    cfg = config_from_dict({"data": {"root": str(data_root), "subset": 8, "test_subset": 8, "augment": False}})
    data = build_data(cfg.data, seed=0, device=torch.device("cpu"))
    assert torch.allclose(data.test.mean.flatten(), torch.tensor(CIFAR100_MEAN))
    assert torch.allclose(data.test.std.flatten(), torch.tensor(CIFAR100_STD))


def test_data_mean_and_std_are_config_values(tmp_path):
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    cfg = config_from_dict(_raw(tmp_path, {"name": "vanilla"}, data={"mean": mean, "std": std, "augment": False}))
    data = build_data(cfg.data, seed=0, device=torch.device("cpu"))
    batch = next(iter(data.test))
    raw = data.test.images[: batch.image.shape[0]].float() / 255
    torch.testing.assert_close(batch.image, (raw - 0.5) / 0.25)


@pytest.mark.parametrize(("data", "message"), [
    ({"mean": [0.5, 0.5, 0.5]}, "set data.mean and data.std together"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "one value per channel"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}, "must be positive"),
])
def test_bad_normalisation_exits_2(tmp_path, capsys, data, message):
    _train_exits_2(tmp_path, capsys, _raw(tmp_path, {"name": "kd"}, data=data), message)


# ---- 1. fp16 GradScaler with nonfinite=skip ---------------------------------------------------------------------


def test_fp16_overflow_with_skip_backs_the_scale_off_and_training_continues(tmp_path):
    cfg = config_from_dict(_raw(tmp_path, {"name": "kd"},
                                runtime={"amp": True, "amp_dtype": "fp16", "nonfinite": "skip"}))
    parts = prepare_run(cfg)
    trainer = Trainer(parts, tmp_path / "run", is_main=False)
    weight = parts.distiller.student.fc.weight
    calls = {"n": 0}

    def overflow_on_first_step(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    weight.register_hook(overflow_on_first_step)
    batch = next(iter(parts.data.train.iterate(1)))
    scale = trainer.scaler.get_scale()
    before = weight.detach().clone()
    trainer.train_step(batch, Progress())
    assert trainer.scaler.get_scale() == scale / 2  # the scaler skipped the update and backed off
    assert torch.equal(weight.detach(), before)
    trainer.train_step(batch, Progress(step=1))
    assert not torch.equal(weight.detach(), before)  # the next step trains
    assert trainer.scaler.get_scale() == scale / 2


def test_fp16_non_finite_loss_with_skip_still_lets_the_scaler_see_the_step(tmp_path):
    cfg = config_from_dict(_raw(tmp_path, {"name": "kd"},
                                runtime={"amp": True, "amp_dtype": "fp16", "nonfinite": "skip"}))
    parts = prepare_run(cfg)
    trainer = Trainer(parts, tmp_path / "run", is_main=False)
    batch = next(iter(parts.data.train.iterate(1)))
    batch.image[0, 0, 0, 0] = float("nan")  # NaN loss: skipped by `skip`, seen by the scaler
    before = parts.distiller.student.fc.weight.detach().clone()
    scale = trainer.scaler.get_scale()
    losses = trainer.train_step(batch, Progress())
    assert torch.equal(parts.distiller.student.fc.weight.detach(), before)
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.isfinite(v) for v in losses.values())


# ---- 3. teacher.taps / student.taps -----------------------------------------------------------------------------

TV_RESNET_TAPS = {"stem": "relu", "stages": ["layer1", "layer2", "layer3", "layer4"], "pooled": "in:fc",
                  "classifier": "fc"}


def test_student_taps_config_key_names_the_taps(tmp_path):
    cfg = config_from_dict(_raw(tmp_path, {"name": "crd", "nce_k": 16},
                                student={"name": "torchvision:resnet18", "taps": TV_RESNET_TAPS}))
    parts = prepare_run(cfg)
    student = parts.distiller.student
    assert [t.module for t in student.tap_spec.stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert student.tap_spec.stages_pre is None  # named taps replace the derived ones (which have pre taps)
    out = kdzoo.features(student.eval(), torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in out.feats] == [64, 64, 128, 256, 512] and out.preact == out.feats


def test_taps_with_a_wrong_module_path_exit_2_naming_it(tmp_path, capsys):
    taps = {**TV_RESNET_TAPS, "stages": ["layer1", "layr2", "layer3", "layer4"]}
    raw = _raw(tmp_path, {"name": "fitnet"}, student={"name": "torchvision:resnet18", "taps": taps})
    _train_exits_2(tmp_path, capsys, raw, "student.taps.stages[1]: ResNet has no module 'layr2'. Did you mean 'layer2'")


def test_untappable_model_error_names_the_real_config_key():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(UserInputError, match=r"teacher\.taps \(or student\.taps\)"):
        kdzoo.models.FeatureExtractor(model, ("feats",))


# ---- 4. stage overrides take effect ------------------------------------------------------------------------------


def _fitnet(**cfg) -> kdzoo.methods.Distiller:
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    return kdzoo.create_distiller("fitnet", teacher=teacher, student=student, hint_stage_epochs=2, **cfg)


def test_fitnet_hint_stage_trainable_override_takes_effect():
    default = _fitnet()
    hint = default.training_stages()[0]
    trunk = {id(p) for p in default.trainable_parameters(hint)}
    assert trunk < {id(p) for p in [*default.student.parameters(), *default.regressor.parameters()]}
    assert id(default.student.fc.weight) not in trunk  # the paper's W_Guided stops at the hint layer

    overridden = _fitnet(stages=[{"name": "hint", "trainable": ["student", "regressor"], "lr": 0.01, "epochs": 3}])
    stage = overridden.training_stages()[0]
    assert (stage.name, stage.epochs, stage.lr) == ("hint", 3, 0.01)
    trained = {id(p) for p in overridden.trainable_parameters(stage)}
    assert trained == {id(p) for p in [*overridden.student.parameters(), *overridden.regressor.parameters()]}


def test_stage_override_naming_an_unknown_parameter_set_exits_2(tmp_path, capsys):
    method = {"name": "fitnet", "hint_stage_epochs": 1, "stages": [{"name": "hint", "trainable": ["studnet"]}]}
    _train_exits_2(tmp_path, capsys, _raw(tmp_path, method), "trains 'studnet', which is not one of its parameter sets")


def test_stage_override_naming_an_undeclared_stage_exits_2(tmp_path, capsys):
    method = {"name": "kd", "stages": [{"name": "init", "epochs": 2}]}
    _train_exits_2(tmp_path, capsys, _raw(tmp_path, method), "kd declares the stages ['main']")


# ---- 5. SemCKD's batch size --------------------------------------------------------------------------------------


def test_semckd_batch_width_comes_from_data_batch_size(tmp_path):
    cfg = config_from_dict(_raw(tmp_path, {"name": "semckd"}, data={"batch_size": 8}))
    parts = prepare_run(cfg)
    assert parts.distiller.queries[0].linear1.in_features == 8
    assert parts.data.train.drop_last  # every batch has the width the MLPs were built for


def test_semckd_method_batch_size_is_no_longer_a_key(tmp_path, capsys):
    raw = _raw(tmp_path, {"name": "semckd", "batch_size": 64})
    _train_exits_2(tmp_path, capsys, raw, "unknown config key 'method (semckd).batch_size'")


# ---- batch contract: CRD's negatives under every reference's keyword ------------------------------------------


@pytest.mark.parametrize("keyword", ["contrast_index", "contrastive_index", "contrast_idx"])
def test_forward_train_takes_crd_negatives_under_each_references_name(keyword):
    def crd() -> kdzoo.methods.Distiller:
        torch.manual_seed(0)
        teacher, student = kdzoo.create_model("resnet8", num_classes=10), kdzoo.create_model("resnet8", num_classes=10)
        return kdzoo.create_distiller("crd", teacher=teacher, student=student, num_data=32, nce_k=4)

    distiller, reference = crd(), crd()
    images, target, index = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 9, 31])
    negatives = torch.stack([index, *torch.randint(0, 32, (4, 4)).T], dim=1)  # column 0 = the positive
    _, expected = reference.training_step(Batch(images, target, index, contrast_index=negatives), Progress())
    _, losses = distiller.forward_train(image=images, target=target, index=index, **{keyword: negatives})
    torch.testing.assert_close(losses["loss_crd"], expected["loss_crd"], rtol=0, atol=0)


def test_forward_train_rejects_an_unknown_batch_keyword():
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("kd", teacher=teacher, student=student)
    with pytest.raises(TypeError, match=r"unexpected keywords \['view'\]"):
        distiller.forward_train(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), view=None)

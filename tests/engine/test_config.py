"""Config loading: _base_ inheritance, dotted overrides, schema validation with named keys."""

from __future__ import annotations

import pytest

from kdzoo.config.loader import config_from_dict, load_config
from kdzoo.errors import UserInputError
from kdzoo.methods.base import build_method_config
from kdzoo.methods.registry import method_class
from tests.conftest import REPO_ROOT

KD_RECIPE = REPO_ROOT / "configs" / "cifar100" / "kd" / "resnet32x4_resnet8x4.yaml"


def test_recipe_inherits_base_and_applies_overrides():
    cfg = load_config(KD_RECIPE, ["data.root=../shared/data", "schedule.epochs=1", "optim.lr=0.1"])
    assert cfg.schedule.epochs == 1 and cfg.schedule.milestones == [150, 180, 210]  # from _base_
    assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 5e-4 and cfg.data.batch_size == 64
    assert cfg.method == {"name": "kd"}  # the recipe states only what differs from the method's defaults
    method_cfg = build_method_config(method_class("kd"), dict(cfg.method), {})
    assert (method_cfg.temperature, method_cfg.ce_weight, method_cfg.kd_weight) == (4.0, 0.1, 0.9)
    assert cfg.published.top1 is not None and cfg.published.source
    assert cfg.teacher.name == "resnet32x4" and cfg.student.name == "resnet8x4"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], r"unknown config key 'optim.lrr'\. Did you mean 'lr'\?"),
        (["schedul.epochs=1"], r"unknown config key 'schedul'\. Did you mean 'schedule'\?"),
        (["schedule.epochs=ten"], r"schedule.epochs"),
        (["data.batch_size=0"], r"data.batch_size must be positive"),
        (["method.name=kdd"], r"unknown method 'kdd'\. Did you mean 'kd'\?"),
        (["method.temprature=2"], r"unknown config key 'method \(kd\).temprature'\. Did you mean 'temperature'\?"),
        (["method.temperature=hot"], r"temperature"),
        (["student.name=resnet8x5"], r"unknown model 'resnet8x5'"),
        (["teacher.checkpoint=null"], r"needs a trained teacher"),
        (["optim.name=adamw"], r"optim.name must be 'sgd' or 'dot'"),
        (["schedule.milestones=[180,150]"], r"milestones must be increasing"),
        (["nonsense"], r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserInputError, match=message):
        load_config(KD_RECIPE, overrides)


def test_base_cycle_and_missing_base(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(UserInputError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("data: [1, 2\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_config(tmp_path / "d.yaml")


def test_method_stages_are_configurable():
    import kdzoo

    recipe = REPO_ROOT / "configs" / "cifar100" / "ab" / "resnet32x4_resnet8x4.yaml"
    cfg = load_config(recipe, ["method.stages=[{name: init, epochs: 3, lr: 0.02}]"])
    teacher, student = kdzoo.create_model("resnet8x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("ab", teacher=teacher, student=student, cfg=dict(cfg.method))
    declared = {s.name: s for s in distiller.stages()}
    stages = distiller.training_stages()
    assert [s.name for s in stages] == ["init", "main"]
    assert (stages[0].epochs, stages[0].lr) == (3, 0.02) and declared["init"].epochs == 30  # RD: 30 epochs
    assert stages[0].trainable == declared["init"].trainable and stages[1] == declared["main"]
    with pytest.raises(UserInputError, match=r"names stage 'warmup', but ab runs the stages \['init', 'main'\]"):
        kdzoo.create_distiller("ab", teacher=teacher, student=student, stages=[{"name": "warmup"}]).training_stages()
    with pytest.raises(UserInputError, match=r"unknown config key 'method.stages\[0\].epoch'"):
        load_config(recipe, ["method.stages=[{name: init, epoch: 3}]"])


def test_a_dense_model_in_a_classification_run_is_a_config_error():
    with pytest.raises(UserInputError, match="deeplabv3plus_resnet18 is a segmentation model, but task=classification"):
        config_from_dict({"student": {"name": "deeplabv3plus_resnet18"}})
    with pytest.raises(UserInputError, match="is a detection model, but task=classification"):
        config_from_dict({"student": {"name": "fasterrcnn_resnet18_fpn"}})

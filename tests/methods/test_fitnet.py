"""FitNet: golden parity with RepDistiller (HintLoss + ConvReg, hint layer 2), ConvReg branches, the
opt-in hint stage and the reference defaults."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.fitnet import ConvReg
from kdzoo.types import Batch, Progress, Stage
from tests.methods.golden_step import (
    assert_extra_grads,
    assert_loss,
    assert_student_grads,
    build_pair,
    load_extra_by_order,
    run_step,
)


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "fitnet.pt", weights_only=True)


def test_fitnet_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("fitnet", teacher=teacher, student=student)
    assert isinstance(distiller.regressor.conv, torch.nn.Conv2d) and distiller.regressor.conv.kernel_size == (1, 1)
    load_extra_by_order(distiller.regressor, ref)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_fitnet"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_fitnet"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)
    assert_extra_grads(dict(distiller.regressor.named_parameters()), ref)


def test_fitnet_with_kd_term_adds_repdistiller_loss_div(golden_common, ref):
    # SimKD's scripts run FitNet with -d 1: the KD term must equal RepDistiller's loss_div.
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("fitnet", teacher=teacher, student=student, kd_weight=1.0)
    load_extra_by_order(distiller.regressor, ref)
    losses, total = run_step(distiller, golden_common)
    assert_loss(losses["loss_kd"], ref["losses"]["loss_div"])
    assert_loss(total, ref["total"] + ref["losses"]["loss_div"])


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "conv_type", "kernel"),
    [
        ((2, 8, 32, 32), (2, 16, 16, 16), torch.nn.Conv2d, (3, 3)),
        ((2, 8, 8, 8), (2, 16, 16, 16), torch.nn.ConvTranspose2d, (4, 4)),
        ((2, 8, 16, 16), (2, 16, 14, 14), torch.nn.Conv2d, (3, 3)),
        ((2, 8, 4, 4), (2, 16, 4, 4), torch.nn.Conv2d, (1, 1)),
    ],
)
def test_convreg_branches_produce_teacher_shape(student_shape, teacher_shape, conv_type, kernel):
    regressor = ConvReg(student_shape, teacher_shape)
    assert type(regressor.conv) is conv_type and regressor.conv.kernel_size == kernel
    out = regressor(torch.randn(student_shape))
    assert out.shape == teacher_shape and out.min() >= 0  # ReLU at the end


def test_convreg_rejects_unsupported_upsampling():
    with pytest.raises(UserInputError, match="ConvReg"):
        ConvReg((2, 8, 4, 4), (2, 16, 16, 16))


def test_reference_defaults_and_single_stage():
    distiller = kdzoo.create_distiller(
        "fitnet", teacher=kdzoo.create_model("resnet32x4"), student=kdzoo.create_model("resnet8x4")
    )
    cfg = distiller.cfg
    assert (cfg.hint_layer, cfg.feat_weight, cfg.ce_weight, cfg.kd_weight) == (2, 100.0, 1.0, 0.0)
    assert cfg.hint_stage_epochs == 0
    assert [s.name for s in distiller.stages()] == ["main"]
    assert distiller.num_extra_parameters() == 128 * 128 + 128 + 2 * 128


def test_hint_stage_trains_only_the_trunk_and_regressor():
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model("resnet20"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("fitnet", teacher=teacher, student=student, hint_stage_epochs=3)
    hint, main = distiller.stages()
    assert (hint.name, hint.epochs, hint.use_schedule, main.name) == ("hint", 3, False, "main")

    names = {id(p): n for n, p in distiller.named_parameters()}
    hint_params = {names[id(p)] for p in distiller.trainable_parameters(hint)}
    assert {"student.conv1.weight", "student.layer1.0.conv1.weight", "student.layer2.0.bn2.bias"} <= hint_params
    assert {"regressor.conv.weight", "regressor.bn.weight"} <= hint_params
    assert not any(n.startswith(("student.layer3", "student.fc")) for n in hint_params)
    main_params = list(distiller.trainable_parameters(main))
    assert len(main_params) == len(list(student.parameters())) + len(list(distiller.regressor.parameters()))

    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    _, losses = distiller.training_step(batch, Progress(stage="hint"))
    assert set(losses) == {"loss_fitnet"} and torch.isfinite(losses["loss_fitnet"])
    _, losses = distiller.training_step(batch, Progress(stage="main"))
    assert set(losses) == {"loss_ce", "loss_fitnet"}
    assert list(distiller.param_groups(Stage("hint", trainable=("student", "regressor"))))[0]["params"]


def test_hint_layer_out_of_range_is_a_user_error():
    with pytest.raises(UserInputError, match="hint_layer"):
        kdzoo.create_distiller("fitnet", teacher=kdzoo.create_model("resnet8"), student=kdzoo.create_model("resnet8"),
                               hint_layer=7)

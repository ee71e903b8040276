"""FT (factor transfer) against RepDistiller's fixture: init stage (paraphraser reconstruction), main stage
(CE + factor loss through the translator), stage declarations, heterogeneous pairs."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.methods.base import Distiller
from tests.methods.golden_step import (
    assert_extra_grads,
    assert_loss,
    assert_student_grads,
    build_pair,
    run_step,
    stage_step,
    trainable_names,
)


@pytest.fixture(scope="module")
def ft_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "ft.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_distiller(golden_common, ft_ref) -> Distiller:
    # Shared: a step without an optimiser changes only train-mode BatchNorm statistics, which no
    # train-mode output depends on.
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("ft", teacher=teacher, student=student)
    # kdzoo keeps RepDistiller's names (translator.encoder.N, paraphraser.encoder/decoder.N): load by name.
    extra = {k: v for k, v in distiller.state_dict().items() if k.startswith(("translator.", "paraphraser."))}
    assert set(extra) == set(ft_ref["extra_state_dict"])
    missing, unexpected = distiller.load_state_dict(ft_ref["extra_state_dict"], strict=False)
    assert not unexpected and all(k.startswith(("student.", "teacher.")) for k in missing)
    return distiller


def test_main_stage_matches_repdistiller(golden_common, ft_ref, golden_distiller):
    distiller = golden_distiller
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_ft"}
    raw, weights = ft_ref["losses"], ft_ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_ft"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(losses["loss_ft"], 200 * 0.035256147384643555)
    assert_loss(total, ft_ref["total"])
    assert_student_grads(distiller.student, ft_ref)
    # The translator's gradients match RD's. RD also lets gradients reach the paraphraser, which it never
    # steps; kdzoo runs the paraphraser under no_grad, so only the translator's entries are compared.
    translator_ref = dict(ft_ref)
    for key in ("extra_grads", "extra_grads_head", "extra_grad_norms"):
        translator_ref[key] = {k: v for k, v in ft_ref[key].items() if k.startswith("translator.")}
    assert len(translator_ref["extra_grad_norms"]) == 12
    assert_extra_grads(dict(distiller.named_parameters()), translator_ref)
    assert all(p.grad is None for p in distiller.paraphraser.parameters())


def test_init_stage_matches_repdistiller(golden_common, ft_ref, golden_distiller):
    distiller = golden_distiller
    student = distiller.student
    running_mean = student.bn1.running_mean.clone()
    ref = ft_ref["init_stage"]
    losses = stage_step(distiller, golden_common["images"], golden_common["labels"], "init")
    assert set(losses) == {"loss_ft_reconstruction"}
    assert_loss(losses["loss_ft_reconstruction"], ref["losses"]["loss_init"])
    assert_loss(losses["loss_ft_reconstruction"], 10.684223175048828)
    assert_extra_grads(dict(distiller.named_parameters()), ref)
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in distiller.translator.parameters())
    # RD's init() runs the student in eval mode: its BatchNorm statistics do not move.
    torch.testing.assert_close(student.bn1.running_mean, running_mean, rtol=0, atol=0)
    assert student.training


def test_stages_declare_reference_schedule(golden_common, ft_ref, golden_distiller):
    distiller = golden_distiller
    init, main = distiller.stages()
    assert (init.name, init.epochs, init.lr, init.use_schedule) == ("init", 30, 0.01, False)  # ResNet student
    assert (main.name, main.epochs, main.lr, main.use_schedule) == ("main", None, None, True)
    paraphraser = {n for n, _ in distiller.paraphraser.named_parameters(prefix="paraphraser")}
    assert trainable_names(distiller, init) == paraphraser
    student_params = {f"student.{n}" for n, _ in distiller.student.named_parameters()}
    assert trainable_names(distiller, main) == student_params | set(ft_ref["extra_trainable"])
    pair = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    cfg = kdzoo.create_distiller("ft", teacher=pair[0], student=pair[1]).cfg
    assert (cfg.ft_weight, cfg.paraphrase_rate, cfg.init_epochs, cfg.init_lr, cfg.ce_weight, cfg.kd_weight) == (
        200.0, 0.5, 30, None, 1.0, 0.0)
    assert distiller.num_extra_parameters() == sum(torch.Size(s).numel() for _, s in ft_ref["extra_param_order"])


@pytest.mark.parametrize("pair", [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")])
def test_heterogeneous_pairs_train_in_both_stages(pair):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(pair[0]), kdzoo.create_model(pair[1])
    distiller = kdzoo.create_distiller("ft", teacher=teacher, student=student)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    init, main = distiller.stages()
    # RD's 0.01 init lr applies to ResNet/WRN students only; others use the base lr.
    assert init.lr == (0.01 if pair[1] == "wrn_16_2" else None)

    losses = stage_step(distiller, images, labels, "init")
    assert torch.isfinite(losses["loss_ft_reconstruction"])
    for name, p in distiller.named_parameters():
        if name.startswith("paraphraser."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name

    losses = stage_step(distiller, images, labels, "main")
    assert set(losses) == {"loss_ce", "loss_ft"} and all(torch.isfinite(v) for v in losses.values())
    for name, p in [*student.named_parameters(), *distiller.translator.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in distiller.paraphraser.parameters())

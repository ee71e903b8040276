"""SemCKD: golden parity with DefangChen/SimKD (methods/semckd.pt), batch-size contract, fp32 attention under
autocast, defaults and heterogeneous pairs."""

from __future__ import annotations

import re

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.types import Batch, Progress
from tests.methods.golden_step import (
    assert_extra_grads,
    assert_loss,
    assert_student_grads,
    build_pair,
    load_extra_by_order,
    run_step,
)

# SK's MLPEmbed registers a `regressor` Sequential that is never called (no gradient ever): kdzoo leaves it out.
UNUSED_REFERENCE_PARAM = re.compile(r"^(query|key)_\d+\.regressor\.")


@pytest.fixture(scope="module")
def semckd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "semckd.pt", weights_only=True)


def _extra_params(distiller):
    return [*distiller.queries.parameters(), *distiller.keys.parameters(), *distiller.projections.parameters()]


def test_semckd_matches_reference(golden_common, semckd_ref):
    ref = semckd_ref
    teacher, student = build_pair(golden_common)
    batch_size = golden_common["images"].shape[0]
    assert ref["hparams"]["selfa_feat_dim"] == batch_size == 16
    distiller = kdzoo.create_distiller("semckd", teacher=teacher, student=student, batch_size=batch_size)
    used_order = [(n, s) for n, s in ref["extra_param_order"] if not UNUSED_REFERENCE_PARAM.match(n)]
    assert len(ref["extra_param_order"]) - len(used_order) == 4 * 6  # 2 Linear layers in each of 3 + 3 MLPs
    params = _extra_params(distiller)
    load_extra_by_order(distiller, {**ref, "extra_param_order": used_order}, params=params,
                        buffers=list(distiller.projections.buffers()))
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_semckd"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_kd"], weights["loss_div"] * raw["loss_div"])
    assert_loss(losses["loss_semckd"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)
    named = {name: p for (name, _), p in zip(used_order, params, strict=True)}
    # Elementwise gradients via the shared helper; the norms are compared here in float64 because a float32
    # ``Tensor.norm()`` over the 2.4M-value 3x3 heads accumulates ~1e-4 relative error on CPU by itself.
    assert_extra_grads(named, {**ref, "extra_grad_norms": {}})
    for name, norm in ref["extra_grad_norms"].items():
        torch.testing.assert_close(named[name].grad.double().norm().item(), norm, rtol=1e-4, atol=0.0, msg=name)
    # Every extra parameter kdzoo keeps gets a gradient (the reference's unused ones are exactly those left out).
    assert set(ref["extra_grad_norms"]) == set(named)
    assert all(p.grad is not None for p in params)
    # Golden: 10,220,048 values including the 6 unused 172-value regressors.
    assert distiller.num_extra_parameters() == 10_220_048 - 6 * 172


def test_semckd_needs_the_configured_batch_size(golden_common):
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("semckd", teacher=teacher, student=student, batch_size=8)
    assert type(distiller).needs_fixed_batch_size
    distiller.train()
    with pytest.raises(UserInputError, match="batch_size"):
        distiller.training_step(Batch(golden_common["images"][:4], golden_common["labels"][:4]), Progress())


def test_semckd_attention_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    distiller = kdzoo.create_distiller(
        "semckd", teacher=kdzoo.create_model("resnet8"), student=kdzoo.create_model("resnet8"), batch_size=4)
    # Gram entries of size ~1e5: fp16/bf16 MLP inputs would overflow or lose the attention entirely.
    s_maps = [torch.rand(4, 16, 32, 32) * 10, torch.rand(4, 32, 16, 16) * 10, torch.rand(4, 64, 8, 8) * 10]
    t_maps = [m.flip(0) for m in s_maps]
    reference = distiller.attention(s_maps, t_maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = distiller.attention([m.bfloat16() for m in s_maps], [m.bfloat16() for m in t_maps])
    assert mixed.dtype == torch.float32 and reference.shape == (4, 3, 3)
    torch.testing.assert_close(reference.sum(-1), torch.ones(4, 3))
    torch.testing.assert_close(mixed, reference, rtol=2e-2, atol=2e-3)  # only the bf16 inputs' rounding


def test_semckd_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    with pytest.raises(UserInputError, match="pass batch_size"):
        kdzoo.create_distiller("semckd", teacher=teacher, student=student)
    distiller = kdzoo.create_distiller("semckd", teacher=teacher, student=student, batch_size=64)  # SimKD recipe
    cfg = distiller.cfg
    assert (cfg.semckd_weight, cfg.ce_weight, cfg.kd_weight, cfg.temperature) == (400.0, 1.0, 1.0, 4.0)
    assert (cfg.attention_temperature, cfg.embed_factor) == (1.0, 4)
    assert distiller.queries[0].linear1.in_features == 64 and distiller.queries[0].linear2.out_features == 16
    assert len(distiller.projections) == 9
    assert distiller.export_student() is student


HETERO_PAIRS = [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2")]


@pytest.mark.parametrize(("teacher_name", "student_name"), HETERO_PAIRS)
def test_semckd_heterogeneous_pairs(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("semckd", teacher=teacher, student=student, batch_size=4)
    distiller.train()
    _, losses = distiller.training_step(Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))), Progress())
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_semckd"] > 0
    total.backward()
    for name, p in [*student.named_parameters(), *distiller.named_parameters()]:
        if name.startswith("teacher."):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

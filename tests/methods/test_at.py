"""AT: golden parity with RepDistiller's Attention(p=2), per stage, and the pooling branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.methods.at import at_stage_losses
from kdzoo.types import Batch
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def ref(golden_dir):
    return torch.load(golden_dir / "methods" / "at.pt", weights_only=True)


def test_at_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("at", teacher=teacher, student=student)
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_at"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_at"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)

    # Per-stage terms (stage 1 first) from the same train-mode forward.
    with torch.no_grad():
        batch = Batch(golden_common["images"], golden_common["labels"])
        s_out, t_out = distiller.student_extractor(batch.image), distiller.teacher_forward(batch)
    stages = at_stage_losses(s_out.feats[1:], t_out.feats[1:], p=2.0)
    assert len(stages) == 3
    for actual, expected in zip(stages, ref["loss_terms"]["loss_kd"], strict=True):
        torch.testing.assert_close(actual.item(), expected, rtol=1e-4, atol=1e-9)


def test_at_pools_the_larger_map_and_ignores_channel_counts():
    torch.manual_seed(0)
    f_s, f_t = torch.rand(3, 5, 8, 8, dtype=torch.float64), torch.rand(3, 7, 16, 16, dtype=torch.float64)
    (loss,) = at_stage_losses([f_s], [f_t], p=2.0)
    pooled_t = F.avg_pool2d(f_t, 2)  # adaptive pooling 16 -> 8 is a 2x2 average
    a_s = F.normalize(f_s.pow(2).mean(1).flatten(1))
    a_t = F.normalize(pooled_t.pow(2).mean(1).flatten(1))
    torch.testing.assert_close(loss, (a_s - a_t).pow(2).mean())
    # Symmetric case: the student map is the larger one.
    (swapped,) = at_stage_losses([f_t], [f_s], p=2.0)
    torch.testing.assert_close(swapped, loss)


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("at", teacher=teacher, student=student)
    assert (distiller.cfg.p, distiller.cfg.feat_weight, distiller.cfg.ce_weight, distiller.cfg.kd_weight) == (
        2.0, 1000.0, 1.0, 0.0)
    assert distiller.num_extra_parameters() == 0

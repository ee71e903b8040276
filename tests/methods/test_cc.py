"""CC: golden parity with RepDistiller's Correlation + two trainable LinearEmbeds, and the paper's
Taylor-expanded RBF variant."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.cc import cc_loss_paper
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
    return torch.load(golden_dir / "methods" / "cc.pt", weights_only=True)


def test_cc_matches_repdistiller(golden_common, ref):
    teacher, student = build_pair(golden_common)
    distiller = kdzoo.create_distiller("cc", teacher=teacher, student=student)
    extra = dict(distiller.named_parameters())
    extra = {name: extra[name] for name, _ in ref["extra_param_order"]}  # same names as RD's variables
    load_extra_by_order(distiller, ref, params=list(extra.values()), buffers=[])
    assert distiller.extra_parameters() == list(extra.values())  # registration order = RD's
    losses, total = run_step(distiller, golden_common)
    assert set(losses) == {"loss_ce", "loss_cc"}
    raw, weights = ref["losses"], ref["loss_weights"]
    assert_loss(losses["loss_ce"], weights["loss_cls"] * raw["loss_cls"])
    assert_loss(losses["loss_cc"], weights["loss_kd"] * raw["loss_kd"])
    assert_loss(total, ref["total"])
    assert_student_grads(student, ref)
    assert_extra_grads(extra, ref)  # the teacher-side embedding is trained too


def test_paper_variant_matches_row_by_row_taylor_expansion():
    torch.manual_seed(0)
    e_s, e_t = torch.randn(5, 8, dtype=torch.float64) / 3, torch.randn(5, 8, dtype=torch.float64) / 3
    gamma, order = 0.4, 2

    def correlation(e):  # torchdistill-style loop over rows, as an independent oracle
        rows = []
        for row in e:
            inner = row @ e.T
            rows.append(math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * inner**p
                                                   for p in range(order + 1)))
        return torch.stack(rows)

    expected = torch.dist(correlation(e_s), correlation(e_t), 2) / 25
    torch.testing.assert_close(cc_loss_paper(e_s, e_t, gamma, order), expected)


def test_paper_variant_runs_and_unknown_variant_is_rejected():
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("cc", teacher=teacher, student=student, variant="paper")
    _, losses = distiller.forward_train(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)))
    assert torch.isfinite(losses["loss_cc"]) and losses["loss_cc"] > 0
    with pytest.raises(UserInputError, match="variant"):
        kdzoo.create_distiller("cc", teacher=teacher, student=student, variant="tf")


def test_reference_defaults():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("cc", teacher=teacher, student=student)
    cfg = distiller.cfg
    assert (cfg.feat_dim, cfg.feat_weight, cfg.ce_weight, cfg.kd_weight, cfg.variant) == (128, 0.02, 1.0, 0.0, "rd")
    assert distiller.num_extra_parameters() == 2 * (256 * 128 + 128)

"""DIST (docs/methods/dist.md) against its equations worked out with explicit float64 loops, plus one training step on
resnet32x4 -> resnet8x4 and the heterogeneous pairs."""

from __future__ import annotations

import math

import pytest
import torch

import kdzoo
from kdzoo.methods.dist import dist_terms
from kdzoo.models.taps import Outputs
from kdzoo.types import Batch, Progress
from tests.methods.one_step import HETEROGENEOUS_PAIRS, STUDENT_LOGITS, TARGETS, TEACHER_LOGITS, train_one_step


def softmax_rows(rows: list[list[float]], tau: float) -> list[list[float]]:
    out = []
    for row in rows:
        exps = [math.exp(v / tau) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


def pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - mean_a for x in a], [y - mean_b for y in b]
    cov = sum(x * y for x, y in zip(da, db, strict=True))
    return cov / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + eps)


def expected_dist(tau: float) -> tuple[float, float]:
    p_s, p_t = softmax_rows(STUDENT_LOGITS, tau), softmax_rows(TEACHER_LOGITS, tau)
    n, k = len(p_s), len(p_s[0])
    inter = 1.0 - sum(pearson(p_s[i], p_t[i]) for i in range(n)) / n
    columns = [([p_s[i][j] for i in range(n)], [p_t[i][j] for i in range(n)]) for j in range(k)]
    intra = 1.0 - sum(pearson(a, b) for a, b in columns) / k
    return tau**2 * inter, tau**2 * intra


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_terms_match_hand_computed_pearson_correlations(tau):
    inter, intra = dist_terms(torch.tensor(STUDENT_LOGITS, dtype=torch.float64),
                              torch.tensor(TEACHER_LOGITS, dtype=torch.float64), tau)
    exp_inter, exp_intra = expected_dist(tau)
    assert inter.item() == pytest.approx(exp_inter, rel=1e-10)
    assert intra.item() == pytest.approx(exp_intra, rel=1e-10)


def test_weighted_losses_and_reference_defaults():
    distiller = kdzoo.create_distiller("dist", teacher=kdzoo.create_model("resnet32x4"),
                                       student=kdzoo.create_model("resnet8x4"))
    cfg = distiller.cfg
    assert (cfg.beta, cfg.gamma, cfg.temperature, cfg.ce_weight) == (2.0, 2.0, 4.0, 1.0)
    assert distiller.num_extra_parameters() == 0
    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    target = torch.tensor(TARGETS)
    losses = distiller.compute_losses(Outputs(student), Outputs(teacher), Batch(torch.zeros(3), target), Progress())
    assert set(losses) == {"loss_ce", "loss_dist_inter", "loss_dist_intra"}
    exp_inter, exp_intra = expected_dist(4.0)
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(STUDENT_LOGITS, TARGETS,
                                                                                 strict=True)) / 3
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["loss_dist_inter"].item() == pytest.approx(2.0 * exp_inter, rel=1e-5)
    assert losses["loss_dist_intra"].item() == pytest.approx(2.0 * exp_intra, rel=1e-5)


def test_identical_predictions_give_zero_relation_losses():
    # Zero up to the reference's eps in the correlation's denominator (1 - |a|^2/(|a|^2 + 1e-8), times tau^2).
    logits = torch.tensor(TEACHER_LOGITS, dtype=torch.float64)
    inter, intra = dist_terms(logits, logits, 4.0)
    assert 0 <= inter.item() < 1e-4 and 0 <= intra.item() < 1e-4


def test_training_step_resnet32x4_resnet8x4():
    _, losses = train_one_step("dist")
    assert set(losses) == {"loss_ce", "loss_dist_inter", "loss_dist_intra"}
    assert losses["loss_dist_inter"] > 0 and losses["loss_dist_intra"] > 0


@pytest.mark.parametrize("pair", HETEROGENEOUS_PAIRS)
def test_heterogeneous_pairs_train(pair):
    train_one_step("dist", *pair)

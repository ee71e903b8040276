"""CRD against RepDistiller's golden calls (loss, Z, memory banks over three calls), the negative
sampler's distribution, checkpointing of banks and sampler, defaults, other pairs."""

from __future__ import annotations

import io
import math

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.crd import ContrastSampler, first_distinct
from kdzoo.types import Batch, DatasetInfo, Progress
from tests.methods.golden_step import assert_extra_grads, assert_loss, assert_student_grads, build_pair, run_step

BANK_RTOL, BANK_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def crd_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "crd.pt", weights_only=True)


def golden_distiller(common, ref):
    """The golden setup: N = 256, K = 64, the reference's embeddings, banks and params (Z unset)."""
    teacher, student = build_pair(common)
    crd = ref["crd"]
    torch.manual_seed(0)  # the reference built its extra modules right after this seed
    distiller = kdzoo.create_distiller("crd", teacher=teacher, student=student, num_data=crd["n_data"],
                                       nce_k=crd["nce_k"])
    sd = ref["extra_state_dict"]
    # Same seed, same construction order (embeddings, then banks) and init: the reference's tensors
    # exactly (weights after its fp16 rounding).
    names = [name for name, _ in ref["extra_param_order"]] + ["contrast.memory_v1", "contrast.memory_v2"]
    tensors = [*distiller.extra_parameters(), distiller.memory_student, distiller.memory_teacher]
    for name, tensor in zip(names, tensors, strict=True):
        assert torch.equal(tensor.detach().to(sd[name].dtype), sd[name]), name
    with torch.no_grad():
        for p, (name, shape) in zip(distiller.extra_parameters(), ref["extra_param_order"], strict=True):
            assert list(p.shape) == shape, name
            p.copy_(sd[name])
        distiller.memory_student.copy_(sd["contrast.memory_v1"])
        distiller.memory_teacher.copy_(sd["contrast.memory_v2"])
        distiller.normalizer.copy_(sd["contrast.params"][2:4])
    params = sd["contrast.params"]
    assert params[0].item() == crd["nce_k"] and params[4].item() == distiller.cfg.nce_momentum
    assert math.isclose(params[1].item(), distiller.cfg.nce_t, rel_tol=1e-6)
    return distiller


@pytest.fixture(scope="module")
def crd_calls(golden_common, crd_ref):
    """Three training steps on the same batch and indices, no parameter update (README: crd.calls)."""
    distiller = golden_distiller(golden_common, crd_ref)
    crd = crd_ref["crd"]
    results = []
    for call in range(3):
        losses, total = run_step(distiller, golden_common, index=crd["index"],
                                 contrast_index=crd["contrast_idx"])
        snapshot = {
            "losses": {k: v.detach() for k, v in losses.items()},
            "total": total.detach(),
            "normalizer": distiller.normalizer.clone(),
            "memory_student": distiller.memory_student.clone(),
            "memory_teacher": distiller.memory_teacher.clone(),
        }
        if call == 0:
            snapshot["student_grads"] = {n: p.grad.clone() for n, p in distiller.student.named_parameters()}
            names = [n for n, _ in crd_ref["extra_param_order"]]
            snapshot["extra"] = dict(zip(names, distiller.extra_parameters(), strict=True))
            snapshot["extra_grads"] = {n: p.grad.clone() for n, p in snapshot["extra"].items()}
        results.append(snapshot)
    return distiller, results


def test_crd_losses_match_repdistiller_over_three_calls(crd_calls, crd_ref):
    _, results = crd_calls
    weights = crd_ref["loss_weights"]
    assert_loss(results[0]["total"], crd_ref["total"])
    for ours, ref_call in zip(results, crd_ref["crd"]["calls"], strict=True):
        assert set(ours["losses"]) == {"loss_ce", "loss_crd"}
        assert_loss(ours["losses"]["loss_ce"], weights["loss_cls"] * ref_call["losses"]["loss_cls"])
        assert_loss(ours["losses"]["loss_crd"], weights["loss_kd"] * ref_call["losses"]["loss_kd"])
        assert_loss(ours["total"], ref_call["total"])


def test_crd_normalizer_and_banks_match_repdistiller(crd_calls, crd_ref):
    _, results = crd_calls
    crd = crd_ref["crd"]
    torch.testing.assert_close(crd_ref["extra_state_dict"]["contrast.memory_v1"], crd["memory_v1_before"])
    for ours, ref_call in zip(results, crd["calls"], strict=True):
        # Z is set on call 1 from that batch and then frozen (RD params[2:4]).
        torch.testing.assert_close(ours["normalizer"], ref_call["params_after"][2:4], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours["memory_student"], ref_call["memory_v1_after"], rtol=BANK_RTOL, atol=BANK_ATOL)
        torch.testing.assert_close(ours["memory_teacher"], ref_call["memory_v2_after"], rtol=BANK_RTOL, atol=BANK_ATOL)
    # Only the rows of the batch's own samples move.
    untouched = torch.ones(crd["n_data"], dtype=torch.bool)
    untouched[crd["index"]] = False
    assert torch.equal(results[-1]["memory_student"][untouched], crd["memory_v1_before"][untouched])


def test_crd_gradients_match_repdistiller(crd_calls, crd_ref):
    distiller, results = crd_calls
    first = results[0]
    # Put call 1's gradients back (calls 2 and 3 overwrote them) and compare.
    for name, p in distiller.student.named_parameters():
        p.grad = first["student_grads"][name]
    for name, p in first["extra"].items():
        p.grad = first["extra_grads"][name]
    assert_student_grads(distiller.student, crd_ref)
    assert_extra_grads(first["extra"], crd_ref)


def test_crd_anchor_terms_match_repdistiller(golden_common, crd_ref):
    distiller = golden_distiller(golden_common, crd_ref)
    crd = crd_ref["crd"]
    distiller.train()
    with torch.no_grad():
        teacher_out = distiller.teacher_forward(Batch(golden_common["images"], golden_common["labels"]))
        student_out = distiller.student_extractor(golden_common["images"])
    for ref_call in crd["calls"]:
        loss_s, loss_t = distiller.contrast_losses(student_out.pooled, teacher_out.pooled, crd["index"],
                                                   crd["contrast_idx"])
        assert_loss(loss_s, ref_call["loss_terms"]["loss_kd_parts"]["loss_crd_s"])
        assert_loss(loss_t, ref_call["loss_terms"]["loss_kd_parts"]["loss_crd_t"])


def test_crd_scores_paths_agree():
    small = {"teacher": kdzoo.create_model("resnet8"), "student": kdzoo.create_model("resnet8")}
    distiller = kdzoo.create_distiller("crd", **small, num_data=40)
    torch.manual_seed(0)
    memory, anchor = torch.randn(40, 128), torch.randn(3, 128)
    for k in (2, 30):  # 3*(k+1) < 40: gathered rows; >= 40: one [N, B] product
        contrast_index = torch.randint(0, 40, (3, k + 1))
        expected = torch.einsum("bkd,bd->bk", memory[contrast_index], anchor)
        torch.testing.assert_close(distiller._scores(memory, contrast_index, anchor), expected)


def _labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def test_sampler_draws_like_cifar100_instance_sample(crd_ref):
    """Properties of RepDistiller's indices, checked on the golden dataset labels and sample indices."""
    crd = crd_ref["crd"]
    labels, index, k = crd["dataset_labels"], crd["index"], crd["nce_k"]
    golden = crd["contrast_idx"]
    sampler = ContrastSampler(seed=0)
    sampler.bind(labels, 100, k, torch.device("cpu"))
    for mode in ("exact", "relax"):
        drawn = sampler(index, k, mode)
        for contrast in (golden, drawn) if mode == "exact" else (drawn,):
            assert contrast.shape == (16, k + 1)
            if mode == "exact":
                assert torch.equal(contrast[:, 0], index)
            assert torch.equal(labels[contrast[:, 0]], labels[index])  # positive: same class
            assert (labels[contrast[:, 1:]] != labels[index][:, None]).all()  # negatives: other classes
            assert all(len(set(row.tolist())) == k for row in contrast[:, 1:])  # without replacement


@pytest.mark.parametrize("k", [40, 150])  # 40: draw-and-dedupe path; 150 of ~180 negatives: random-keys path
def test_sampler_negatives_are_uniform_subsets(k):
    labels = _labels(200, 10)
    sampler = ContrastSampler(seed=1)
    sampler.bind(labels, 10, k, torch.device("cpu"))
    assert (sampler.dedupe_draws is not None) == (k == 40)
    anchor = 7
    negatives = (labels != labels[anchor]).nonzero().flatten()
    rows = 3000
    drawn = sampler(torch.full((rows,), anchor), k, "exact")[:, 1:]
    assert all(len(set(row.tolist())) == k for row in drawn[:50])
    counts = torch.bincount(drawn.flatten(), minlength=200).double()
    assert counts[labels == labels[anchor]].sum() == 0
    # Each negative is in a uniform k-subset with probability k/M: chi-square with M-1 dof.
    expected = rows * k / negatives.numel()
    chi2 = ((counts[negatives] - expected) ** 2 / expected).sum().item() * (1 - k / negatives.numel()) ** -1
    dof = negatives.numel() - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), (chi2, dof)
    # relax: the positive is uniform over the anchor's class.
    positives = sampler(torch.full((rows,), anchor), k, "relax")[:, 0]
    same_class = (labels == labels[anchor]).nonzero().flatten()
    counts = torch.bincount(positives, minlength=200)[same_class].double()
    assert counts.sum() == rows and counts.min() > 0.5 * rows / same_class.numel()


@pytest.mark.parametrize("num_values", [50, 1000])  # <= 4 x 40 draws: the table path; above: the sort path
def test_first_distinct_keeps_the_first_k_distinct_values_in_draw_order(num_values):
    draws = torch.randint(0, 50, (6, 40), generator=torch.Generator().manual_seed(3))
    k = min(len(set(row.tolist())) for row in draws)
    expected = [list(dict.fromkeys(row.tolist()))[:k] for row in draws]
    assert first_distinct(draws, k, num_values).tolist() == expected


def test_sampler_with_replacement_when_k_exceeds_negatives():
    labels = torch.tensor([0] * 8 + [1] * 3)  # class 0 has 3 negatives, class 1 has 8
    sampler = ContrastSampler(seed=2)
    sampler.bind(labels, 2, 5, torch.device("cpu"))
    drawn = sampler(torch.tensor([0, 9, 1]), 5, "exact")
    assert (labels[drawn[:, 1:]] != labels[drawn[:, :1]]).all()
    assert set(drawn[0, 1:].tolist()) <= {8, 9, 10}  # iid over the 3 negatives (RD: replace=True)
    assert len(set(drawn[1, 1:].tolist())) == 5  # 5 <= 8 negatives: without replacement


def test_crd_checkpoint_restores_banks_and_sampler():
    def make():
        small = {"teacher": kdzoo.create_model("resnet8"), "student": kdzoo.create_model("resnet8")}
        return kdzoo.create_distiller("crd", **small, nce_k=16)

    info = DatasetInfo(num_samples=64, num_classes=4, targets=_labels(64, 4))
    first = make()
    unbound = Batch(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.arange(2))
    with pytest.raises(UserInputError, match="bind_dataset"):
        first.training_step(unbound, Progress())
    first.bind_dataset(info)
    assert first.memory_student.shape == (64, 128) and first.memory_teacher.shape == (64, 128)
    first.sampler(torch.arange(4), 16, "exact")  # advance the stream
    buffer = io.BytesIO()
    torch.save(first.method_state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert {"memory_student", "memory_teacher", "normalizer", "sampler._extra_state"} <= set(state)
    second = make()
    second.bind_dataset(info)
    second.load_method_state_dict(state)
    assert torch.equal(second.memory_student, first.memory_student)
    index = torch.tensor([3, 17, 40])
    assert torch.equal(second.sampler(index, 16, "exact"), first.sampler(index, 16, "exact"))
    with pytest.raises(UserInputError, match="num_data"):
        kdzoo.create_distiller("crd", teacher=kdzoo.create_model("resnet8"), student=kdzoo.create_model("resnet8"),
                               num_data=10).bind_dataset(info)


def test_repeated_sample_in_a_batch_updates_its_rows_from_the_last_occurrence(monkeypatch):
    """The gathered DDP batch can hold a padded sample twice. index_copy_ keeps an arbitrary copy on GPUs,
    so every copy must carry the same row (CPU's index_copy_ alone would hide the difference)."""
    written = []
    original = torch.Tensor.index_copy_

    def recording_index_copy(self, dim, index, source):
        written.append((index.clone(), source.clone()))
        return original(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", recording_index_copy)
    torch.manual_seed(0)
    distiller = kdzoo.create_distiller("crd", teacher=kdzoo.create_model("resnet8"),
                                       student=kdzoo.create_model("resnet8"), num_data=10, nce_k=4)
    before = distiller.memory_student.clone()
    v_s, v_t = torch.nn.functional.normalize(torch.randn(2, 3, 128), dim=2)
    distiller._update_memory(torch.tensor([4, 7, 4]), v_s, v_t)
    expected = torch.nn.functional.normalize(0.5 * before[4] + 0.5 * v_s[2], dim=0)  # the last copy of 4
    torch.testing.assert_close(distiller.memory_student[4], expected)
    only_once = torch.nn.functional.normalize(0.5 * before[7] + 0.5 * v_s[1], dim=0)
    torch.testing.assert_close(distiller.memory_student[7], only_once)
    assert torch.equal(distiller.memory_student[[0, 1, 2, 3, 5, 6, 8, 9]], before[[0, 1, 2, 3, 5, 6, 8, 9]])
    assert len(written) == 2  # student bank, teacher bank
    for index, source in written:
        assert index.tolist() == [4, 7, 4] and torch.equal(source[0], source[2])


def test_crd_defaults_and_memory_init():
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    distiller = kdzoo.create_distiller("crd", teacher=teacher, student=student, num_data=50_000)
    cfg = distiller.cfg
    assert (cfg.ce_weight, cfg.kd_weight, cfg.feat_weight, cfg.feat_dim) == (1.0, 0.0, 0.8, 128)
    assert (cfg.nce_k, cfg.nce_t, cfg.nce_momentum, cfg.mode) == (16384, 0.07, 0.5, "exact")
    assert distiller.num_extra_parameters() == 65_792  # golden README: 4 parameters, 65,792 values
    assert torch.equal(distiller.normalizer, torch.tensor([-1.0, -1.0]))
    bound = 1 / math.sqrt(128 / 3)
    for bank in (distiller.memory_student, distiller.memory_teacher):
        assert bank.shape == (50_000, 128) and bank.dtype == torch.float32
        assert bank.abs().max() <= bound
        torch.testing.assert_close(bank.std().item(), bound / math.sqrt(3), rtol=0.01, atol=0)
    assert not torch.equal(distiller.memory_student, distiller.memory_teacher)


def test_crd_trains_with_sampled_negatives_under_autocast():
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model("resnet8"), kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("crd", teacher=teacher, student=student, nce_k=32, mode="relax", kd_weight=1.0)
    distiller.bind_dataset(DatasetInfo(num_samples=80, num_classes=100, targets=_labels(80, 100)))
    distiller.train()
    before = distiller.memory_teacher.clone()
    index = torch.tensor([5, 11, 42, 79])
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)), index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = distiller.training_step(batch, Progress())
    assert set(losses) == {"loss_ce", "loss_kd", "loss_crd"}
    assert losses["loss_crd"].dtype == torch.float32 and torch.isfinite(losses["loss_crd"])
    assert distiller.memory_teacher.dtype == torch.float32
    changed = (distiller.memory_teacher != before).any(dim=1)
    assert torch.equal(changed.nonzero().flatten(), index)
    torch.testing.assert_close(distiller.memory_teacher[index].norm(dim=1), torch.ones(4))
    assert (distiller.normalizer > 0).all()


@pytest.mark.parametrize(("teacher_name", "student_name"), [("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"),
                                                            ("resnet32x4", "ShuffleV2")])
def test_crd_heterogeneous_pairs_train(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model(teacher_name), kdzoo.create_model(student_name)
    distiller = kdzoo.create_distiller("crd", teacher=teacher, student=student, nce_k=16)
    distiller.bind_dataset(DatasetInfo(num_samples=64, num_classes=100, targets=_labels(64, 100)))
    distiller.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,)), torch.tensor([0, 9, 33, 63]))
    _, losses = distiller.training_step(batch, Progress())
    assert set(losses) == {"loss_ce", "loss_crd"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    extra = [(f"extra{i}", p) for i, p in enumerate(distiller.extra_parameters())]
    assert len(extra) == 4  # both embeddings are trained
    for name, p in [*student.named_parameters(), *extra]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

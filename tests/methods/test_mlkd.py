"""MLKD and MLKD+LS (docs/methods/mlkd.md) against an independent re-statement of the reference's
``KD_ours.forward_train`` (Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py``; the LS
variant: sunshangquan/logit-standardization-KD ``mdistiller/distillers/MLKD.py``), written term by term as there:
``F.kl_div`` batch means times T^2, scalars multiplied by boolean masks and then averaged, ``np.percentile``
thresholds; plus the masks, the config checks and training steps that take the strong view from the batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.mlkd import confidence_masks
from kdzoo.methods.registry import method_class
from kdzoo.types import Batch, Progress

B, C = 8, 10
LOSS_RTOL = 1e-6


def zscore(logits):
    return (logits - logits.mean(dim=-1, keepdim=True)) / (1e-7 + logits.std(dim=-1, keepdim=True))


def reference_losses(student_weak, student_strong, teacher_weak, teacher_strong, target, *, base_temperature,
                     ce_weight, kd_weight, standardize):
    """The reference's four returned terms, float64."""

    def kd(student, teacher, temperature):
        if standardize:
            student, teacher = zscore(student), zscore(teacher)
        log_p = F.log_softmax(student / temperature, dim=1)
        return F.kl_div(log_p, F.softmax(teacher / temperature, dim=1), reduction="none").sum(1).mean() * temperature**2

    def cc(student, teacher, temperature):
        p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
        return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / teacher.shape[1]

    def bc(student, teacher, temperature):
        p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
        return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / teacher.shape[0]

    probs = F.softmax(teacher_weak, dim=1)
    confidence = probs.max(dim=1).values.numpy()
    mask = torch.from_numpy(confidence <= np.percentile(confidence, 50))
    class_confidence = probs.sum(dim=0).numpy()
    class_mask = torch.from_numpy(class_confidence <= np.percentile(class_confidence, 50))
    temperatures = [base_temperature, 3.0, 5.0, 2.0, 6.0]
    sw, ss, tw, ts = student_weak, student_strong, teacher_weak, teacher_strong
    kd_weak = sum(kd_weight * (kd(sw, tw, t) * mask).mean() for t in temperatures)
    kd_strong = (sum(kd_weight * kd(ss, ts, t) for t in temperatures[:3])
                 + kd_weight * kd(sw, tw, 2.0) + kd_weight * kd(sw, tw, 6.0))
    return {
        "loss_ce": ce_weight * (F.cross_entropy(sw, target) + F.cross_entropy(ss, target)),
        "loss_kd": kd_weak + kd_strong,
        "loss_cc": sum(kd_weight * (cc(sw, tw, t) * class_mask).mean() for t in temperatures),
        "loss_bc": sum(kd_weight * (bc(sw, tw, t) * mask).mean() for t in temperatures),
    }


REFERENCE_SETTINGS = {
    # KD_ours with mdistiller cfg.py's KD defaults (T 4, CE 0.1, KD 0.9)
    "mlkd": {"base_temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False},
    # LS README: --logit-stand --base-temp 2 --kd-weight 9, CE 0.1 from the LS cfg.py
    "mlkd_ls": {"base_temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "standardize": True},
}


def distiller(method, **hparams):
    return kdzoo.create_distiller(method, teacher=kdzoo.create_model("resnet8"),
                                  student=kdzoo.create_model("resnet8"), **hparams)


def random_logits(batch=B, classes=C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [3.0 * torch.randn(batch, classes, generator=gen, dtype=torch.float64) for _ in range(4)], \
        torch.randint(0, classes, (batch,), generator=gen)


@pytest.mark.parametrize("method", ["mlkd", "mlkd_ls"])
@pytest.mark.parametrize("batch", [8, 7])
def test_losses_and_gradients_equal_the_reference(method, batch):
    (sw, ss, tw, ts), target = random_logits(batch)
    ours_w, ours_s = sw.clone().requires_grad_(), ss.clone().requires_grad_()
    ref_w, ref_s = sw.clone().requires_grad_(), ss.clone().requires_grad_()
    got = distiller(method).mlkd_losses({"weak": (ours_w, tw), "strong": (ours_s, ts)}, target)
    expected = reference_losses(ref_w, ref_s, tw, ts, target, **REFERENCE_SETTINGS[method])
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].item() == pytest.approx(expected[name].item(), rel=LOSS_RTOL), name
    ours = torch.autograd.grad(sum(got.values()), (ours_w, ours_s))
    ref = torch.autograd.grad(sum(expected.values()), (ref_w, ref_s))
    for view, g, e in zip(("weak", "strong"), ours, ref, strict=True):
        assert (g.double() - e).abs().max().item() <= LOSS_RTOL * e.abs().max().item(), view


def test_sample_and_class_masks_are_the_percentile_rule():
    for seed, batch in [(1, 8), (2, 7), (3, 64)]:
        (_, _, teacher, _), _ = random_logits(batch, seed=seed)
        samples, classes = confidence_masks(teacher, 50.0)
        probs = F.softmax(teacher, dim=1)
        confidence, class_confidence = probs.max(1).values.numpy(), probs.sum(0).numpy()
        assert samples.tolist() == (confidence <= np.percentile(confidence, 50)).tolist()
        assert classes.tolist() == (class_confidence <= np.percentile(class_confidence, 50)).tolist()
        # The less confident half is kept (the reference's `le`): (B + 1) // 2 samples when no two tie.
        assert int(samples.sum()) == (batch + 1) // 2
        assert confidence[samples.numpy()].max() < confidence[~samples.numpy()].min()
    samples, _ = confidence_masks(torch.tensor([[5.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 0.0]]), 25.0)
    assert samples.tolist() == [False, False, True, False]  # 25th percentile of 4 values, linear interpolation


def test_masked_terms_scale_the_batch_mean_by_the_kept_fraction():
    """The reference masks after the batch mean: the weak view's instance sum is the full-batch KD sum times the
    fraction kept, whichever samples those are (docs/methods/mlkd.md, Parity notes)."""
    (sw, ss, tw, ts), target = random_logits(7, seed=4)
    method = distiller("mlkd", strong_kd_views=["strong"] * 5)
    temperatures = method.cfg.temperatures
    kd_full = sum(F.kl_div(F.log_softmax(sw / t, 1), F.softmax(tw / t, 1), reduction="batchmean") * t**2
                  for t in temperatures)
    kd_strong = sum(F.kl_div(F.log_softmax(ss / t, 1), F.softmax(ts / t, 1), reduction="batchmean") * t**2
                    for t in temperatures)
    losses = method.mlkd_losses({"weak": (sw, tw), "strong": (ss, ts)}, target)
    assert losses["loss_kd"].item() == pytest.approx(0.9 * (4 / 7 * kd_full + kd_strong).item(), rel=LOSS_RTOL)
    # Not the per-sample masking the mask suggests (KL of the kept samples only, over the batch):
    kept, _ = confidence_masks(tw, 50.0)
    per_sample = sum((F.kl_div(F.log_softmax(sw / t, 1), F.softmax(tw / t, 1), reduction="none").sum(1) * kept).mean()
                     * t**2 for t in temperatures)
    assert (0.9 * (per_sample + kd_strong)).item() != pytest.approx(losses["loss_kd"].item(), rel=1e-3)


def test_standardization_touches_only_the_instance_terms():
    (sw, ss, tw, ts), target = random_logits(seed=5)
    plain = distiller("mlkd", temperatures=[2.0, 3.0, 5.0, 2.0, 6.0], kd_weight=9.0)
    standardized = distiller("mlkd_ls")
    a = plain.mlkd_losses({"weak": (sw, tw), "strong": (ss, ts)}, target)
    b = standardized.mlkd_losses({"weak": (sw, tw), "strong": (ss, ts)}, target)
    for name in ("loss_ce", "loss_cc", "loss_bc"):
        assert b[name].item() == pytest.approx(a[name].item(), rel=1e-12), name
    assert b["loss_kd"].item() != pytest.approx(a["loss_kd"].item(), rel=1e-3)
    # Z-scored KL does not see a per-sample affine change of the logits.
    moved = standardized.mlkd_losses({"weak": (3 * sw + 1, tw), "strong": (2 * ss - 4, ts)}, target)
    assert moved["loss_kd"].item() == pytest.approx(b["loss_kd"].item(), rel=1e-5)


def test_reference_defaults():
    cfg = distiller("mlkd").cfg
    assert (cfg.temperatures, cfg.strong_kd_views, cfg.mask_percentile, cfg.ce_weight, cfg.kd_weight) == (
        [4.0, 3.0, 5.0, 2.0, 6.0], ["strong", "strong", "strong", "weak", "weak"], 50.0, 0.1, 0.9)
    ls = distiller("mlkd_ls").cfg
    assert (ls.temperatures, ls.ce_weight, ls.kd_weight) == ([2.0, 3.0, 5.0, 2.0, 6.0], 0.1, 9.0)
    assert method_class("mlkd").needs_strong_view and method_class("mlkd_ls").needs_strong_view


@pytest.mark.parametrize(("hparams", "message"), [
    ({"temperatures": []}, "non-empty list of positive"),
    ({"temperatures": [4.0, 0.0, 5.0, 2.0, 6.0]}, "non-empty list of positive"),
    ({"strong_kd_views": ["strong", "weak"]}, "names the view"),
    ({"strong_kd_views": ["strong", "strong", "strong", "weak", "both"]}, "names the view"),
    ({"mask_percentile": 120.0}, r"\[0, 100\]"),
    ({"temperature": 4.0}, "temperatures"),  # unknown key: the message suggests the real one
])
def test_config_errors_are_user_errors(hparams, message):
    with pytest.raises(UserInputError, match=message):
        distiller("mlkd", **hparams)


def test_a_batch_without_the_strong_view_is_refused():
    method = distiller("mlkd")
    with pytest.raises(UserInputError, match="strong_image"):
        method.training_step(Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), Progress())


@pytest.mark.parametrize("method", ["mlkd", "mlkd_ls"])
def test_training_step_runs_both_networks_on_both_views(method):
    """One step on resnet32x4 -> resnet8x4: the losses equal the reference on the logits of the two views
    (student forwards in train mode, weak first; teacher in eval mode); gradients reach every student parameter
    and none the teacher."""
    torch.manual_seed(0)
    teacher, student = kdzoo.create_model("resnet32x4"), kdzoo.create_model("resnet8x4")
    method_ = kdzoo.create_distiller(method, teacher=teacher, student=student)
    method_.train()
    weak, strong = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    target = torch.tensor([3, 1, 4, 1])
    twin = copy.deepcopy(student).train()
    with torch.no_grad():
        sw, ss = twin(weak).double(), twin(strong).double()
        tw, ts = teacher(weak).double(), teacher(strong).double()
    predictions, losses = method_.forward_train(weak, target, epoch=1, strong_image=strong)
    assert torch.equal(predictions.detach().double(), sw)  # the weak view's logits, as the reference returns
    expected = reference_losses(sw, ss, tw, ts, target, **REFERENCE_SETTINGS[method])
    for name in expected:
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=1e-5), name
    sum(losses.values()).backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())

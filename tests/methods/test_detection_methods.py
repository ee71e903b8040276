"""KD, DKD, ReviewKD and FitNet on the detection task (issue 13), against independent re-statements of
megvii-research/mdistiller ``detection/`` (``model/rcnn.py`` ``RCNNKD.forward`` / ``forward_pure_roi_head`` /
``rcnn_dkd_loss``, ``mdistiller/distillers/DKD.py`` ``dkd_loss``, ``model/reviewkd.py`` ``ABF`` / ``ReviewKD`` /
``hcl``): loss values and gradients w.r.t. the student's parameters and the method's own modules.

The reference side runs torchvision's own training forward ``student(images, targets)`` for the detector's losses, then
(as mdistiller runs the ROI head a second time for DKD) the student's transform, backbone, RPN and proposal sampling
again under the same RNG seed, and both ROI heads on those sampled proposals; the teacher sees the raw images through
its own transform in eval mode without gradients. kdzoo's side is one opened-up forward
(``Distiller.detector_forwards``), so agreement also shows that both runs sample the same proposals."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.config.schema import DataConfig
from kdzoo.data.detection import build_detection_data
from kdzoo.errors import UserInputError
from kdzoo.methods.dkd import DKD
from kdzoo.methods.fitnet import FitNet
from kdzoo.methods.kd import KD
from kdzoo.methods.reviewkd import ReviewKD
from kdzoo.models.registry import create_model
from kdzoo.types import DETECTION, Batch, Progress, TaskSpec
from tests.conftest import running_in_ci

TASK = TaskSpec(DETECTION)
NUM_CLASSES = 3  # background + 2
SEED = 11
DETECTOR_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
# mdistiller detection/model/config.py KD.DKD (no pair config overrides it); rcnn.py applies no warm-up.
DKD_RECIPE = {"alpha": 1.0, "beta": 0.25, "temperature": 1.0, "warmup_epochs": 0, "ce_weight": 1.0}
# mdistiller detection/configs/ReviewKD/ReviewKD-R18-R101.yaml: loss weight 1.2; rcnn.py: no warm-up.
REVIEWKD_RECIPE = {"reviewkd_weight": 1.2, "warmup_epochs": 0, "ce_weight": 1.0}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student = create_model("fasterrcnn_resnet18_fpn", num_classes=NUM_CLASSES, min_size=160, max_size=200)
    teacher = create_model("fasterrcnn_resnet18_fpn", num_classes=NUM_CLASSES, min_size=160, max_size=200)
    # Fewer proposals than torchvision's defaults (2000 / 512 per image) keep the test fast on 2 cores; the
    # re-statement reads the same settings, so parity does not depend on them.
    student.rpn._pre_nms_top_n = student.rpn._post_nms_top_n = {"training": 300, "testing": 300}
    student.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 160, 192, generator=gen), torch.rand(3, 150, 180, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 80.0, 90.0], [100.0, 40.0, 170.0, 130.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[30.0, 20.0, 120.0, 110.0]]), "labels": torch.tensor([2])},
    ]
    return student, teacher, images, targets


# ---- the re-statement of mdistiller detection/ ---------------------------------------------------------------------
def pure_roi_head(model, features, proposals, image_sizes):
    """mdistiller ``forward_pure_roi_head``: box pooler, box head, predictor on given proposals."""
    heads = model.roi_heads
    return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, image_sizes)))


def reference_forward(student, teacher, images, targets):
    """(torchvision's loss dict, student FPN, teacher FPN, student ROI logits, teacher ROI logits, proposal classes).

    One ``student(images, targets)`` call, read through hooks: its FPN levels (``backbone``'s output), its sampled
    proposals and their classes (``select_training_samples``) and its ROI class logits (``box_predictor``), which are
    what mdistiller's second ``forward_pure_roi_head`` pass computes again (same modules, same proposals)."""
    seen = {}
    heads = student.roi_heads
    sample = heads.select_training_samples

    def spy_samples(proposals, resized):
        seen["samples"] = sample(proposals, resized)
        return seen["samples"]

    def keep(name, pick):
        def hook(_module, _args, out):
            seen[name] = pick(out)  # returns None: the output itself is left untouched
        return hook

    hooks = [student.transform.register_forward_hook(keep("batch", lambda out: out[0])),
             student.backbone.register_forward_hook(keep("features", lambda out: out)),
             heads.box_predictor.register_forward_hook(keep("logits", lambda out: out[0]))]
    heads.select_training_samples = spy_samples
    try:
        torch.manual_seed(SEED)
        losses = student(images, targets)
    finally:
        del heads.select_training_samples
        for hook in hooks:
            hook.remove()
    batch, (sampled, _, labels, _) = seen["batch"], seen["samples"]
    with torch.no_grad():
        teacher_batch, _ = teacher.transform(images)
        assert teacher_batch.image_sizes == batch.image_sizes  # one resize on both sides, as Detectron2's loader
        teacher_features = teacher.backbone(teacher_batch.tensors)
        teacher_logits, _ = pure_roi_head(teacher, teacher_features, sampled, batch.image_sizes)
    return losses, seen["features"], teacher_features, seen["logits"], teacher_logits, torch.cat(labels)


@pytest.fixture(scope="module")
def reference_values(pair):
    """:func:`reference_forward` without gradients, for the value-only tests."""
    student, teacher, images, targets = pair
    student.train()
    with torch.no_grad():
        return reference_forward(student, teacher, images, targets)


def reference_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller ``dkd_loss``: binary (target / rest) KL and non-target KL, summed, / N, times T^2."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other_mask = ~gt_mask

    def cat_mask(p):
        return torch.cat([(p * gt_mask).sum(1, keepdim=True), (p * other_mask).sum(1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_2, pred_teacher_2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


class ReferenceABF(nn.Module):
    """mdistiller ``detection/model/reviewkd.py`` ``ABF``: the residual is resized to this level's size."""

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channel, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        return self.conv2(x), x


class ReferenceReviewKD(nn.Module):
    """mdistiller ``build_kd_trans``: in = out = mid = 256 for five levels, stored deepest first."""

    def __init__(self):
        super().__init__()
        self.abfs = nn.ModuleList([ReferenceABF(256, 256, 256, i < 4) for i in range(5)])[::-1]

    def forward(self, student_features):
        x = student_features[::-1]
        out, residual = self.abfs[0](x[0])
        results = [out]
        for features, abf in zip(x[1:], self.abfs[1:]):
            out, residual = abf(features, residual)
            results.insert(0, out)
        return results


def reference_hcl(fstudent, fteacher):
    """mdistiller ``hcl``: per level MSE + 4/2/1 pools smaller than the height, weights halving, normalised."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)),
                                     F.adaptive_avg_pool2d(ft, (size, size))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


# ---- helpers ---------------------------------------------------------------------------------------------------------
def ours(distiller, images, targets, epoch=1):
    distiller.train()
    torch.manual_seed(SEED)
    _, losses = distiller.training_step(Batch(images, targets), Progress(epoch=epoch, epochs=2))
    return losses


def trainable(module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def assert_grads_match(ours_total, ref_total, ours_params, ref_params):
    grads = torch.autograd.grad(ours_total, [p for _, p in ours_params], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_total, [p for _, p in ref_params], allow_unused=True)
    compared = 0
    for (name, _), g, rg in zip(ours_params, grads, ref_grads, strict=True):
        if rg is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 10


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_dkd_detection_equals_mdistiller(pair):
    student, teacher, images, targets = pair
    distiller = DKD(student, teacher, DKD_RECIPE, task=TASK)
    losses = ours(distiller, images, targets)
    assert set(losses) == DETECTOR_LOSSES | {"loss_tckd", "loss_nckd"}
    ref_losses, _, _, s_logits, t_logits, labels = reference_forward(student, teacher, images, targets)
    assert labels.shape[0] == s_logits.shape[0] and (labels > 0).any() and (labels == 0).any()
    ref_dkd = reference_dkd_loss(s_logits, t_logits, labels, 1.0, 0.25, 1.0)
    for name in DETECTOR_LOSSES:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_tckd"] + losses["loss_nckd"], ref_dkd, rtol=1e-5, atol=1e-7)
    assert ref_dkd > 0
    assert_grads_match(sum(losses.values()), sum(ref_losses.values()) + ref_dkd, trainable(student), trainable(student))


def test_dkd_detection_targets_and_warmup(pair):
    """The DKD targets are the sampled proposals' classes; the warm-up ramps only the distillation terms."""
    student, teacher, images, targets = pair
    distiller = DKD(student, teacher, {**DKD_RECIPE, "warmup_epochs": 4}, task=TASK)
    distiller.train()
    batch = Batch(images, targets)
    torch.manual_seed(SEED)
    with torch.no_grad():
        student_out, teacher_out = distiller.detector_forwards(batch)
        labels = distiller.logit_targets(student_out, batch)
        ramped = distiller.compute_losses(student_out, teacher_out, batch, Progress(epoch=1, epochs=8))
        full = distiller.compute_losses(student_out, teacher_out, batch, Progress(epoch=4, epochs=8))
    torch.testing.assert_close(labels, torch.cat(student_out.detector.proposal_labels))
    assert labels.shape[0] == student_out.logits.shape[0] == teacher_out.logits.shape[0]
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    for name in DETECTOR_LOSSES:
        torch.testing.assert_close(ramped[name], full[name])
    for name in ("loss_tckd", "loss_nckd"):
        torch.testing.assert_close(ramped[name], full[name] / 4)
    assert full["loss_nckd"] > 0


def test_logit_targets_off_detection_are_the_batch_targets():
    classifier = create_model("resnet8", num_classes=5)
    distiller = DKD(classifier, create_model("resnet8", num_classes=5))
    target = torch.tensor([1, 4])
    assert distiller.logit_targets(None, Batch(torch.zeros(2, 3, 32, 32), target)) is target


def test_reviewkd_detection_equals_mdistiller(pair):
    student, teacher, images, targets = pair
    torch.manual_seed(3)
    distiller = ReviewKD(student, teacher, REVIEWKD_RECIPE, task=TASK)
    assert [abf.att_conv is None for abf in distiller.abfs] == [True, False, False, False, False]
    assert [tuple(abf.conv1[0].weight.shape) for abf in distiller.abfs] == [(256, 256, 1, 1)] * 5
    reference = ReferenceReviewKD()
    reference.load_state_dict(distiller.abfs.state_dict(prefix="abfs."))
    reference.train()
    losses = ours(distiller, images, targets)
    assert set(losses) == DETECTOR_LOSSES | {"loss_reviewkd"}
    ref_losses, s_feats, t_feats, _, _, _ = reference_forward(student, teacher, images, targets)
    # p6 (3x3) -> p5 (5x6) is a non-integer nearest resize, the other steps are exact doublings: both fuse paths run.
    assert [tuple(f.shape[-2:]) for f in s_feats.values()] == [(40, 48), (20, 24), (10, 12), (5, 6), (3, 3)]
    ref_kd = reference_hcl(reference(list(s_feats.values())), list(t_feats.values())) * 1.2
    for name in DETECTOR_LOSSES:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_reviewkd"], ref_kd, rtol=1e-5, atol=1e-7)
    ours_params = trainable(student) + [(f"abfs.{n}", p) for n, p in distiller.abfs.named_parameters()]
    ref_params = trainable(student) + [(f"abfs.{n}", p) for n, p in reference.abfs.named_parameters()]
    assert_grads_match(sum(losses.values()), sum(ref_losses.values()) + ref_kd, ours_params, ref_params)


def test_kd_detection_is_detector_losses_plus_kl_of_roi_logits(pair, reference_values):
    student, teacher, images, targets = pair
    distiller = KD(student, teacher, {"ce_weight": 0.5, "kd_weight": 2.0, "temperature": 2.0}, task=TASK)
    with torch.no_grad():
        losses = ours(distiller, images, targets)
    assert set(losses) == DETECTOR_LOSSES | {"loss_kd"}
    ref_losses, _, _, s_logits, t_logits, _ = reference_values
    p_t = torch.softmax(t_logits / 2.0, dim=1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s_logits / 2.0, dim=1))).sum(dim=1).mean() * 4.0
    for name in DETECTOR_LOSSES:
        torch.testing.assert_close(losses[name], 0.5 * ref_losses[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_kd"], 2.0 * kl, rtol=1e-5, atol=1e-7)
    assert kl > 0


def test_ce_and_kd_on_detection_needs_the_student_outputs(pair):
    student, teacher, _, _ = pair
    distiller = KD(student, teacher, task=TASK)
    logits = torch.zeros(4, NUM_CLASSES)
    with pytest.raises(ValueError, match="needs the student's Outputs"):
        distiller.ce_and_kd(logits, logits, None)


def test_fitnet_detection_hint_is_mse_of_1x1_regressed_fpn_levels(pair, reference_values):
    student, teacher, images, targets = pair
    torch.manual_seed(5)
    distiller = FitNet(student, teacher, {"feat_weight": 3.0, "fpn_levels": ["0", "pool"]}, task=TASK)
    assert sorted(distiller.regressor) == ["0", "pool"]
    assert tuple(distiller.regressor["0"].weight.shape) == (256, 256, 1, 1)
    with torch.no_grad():
        losses = ours(distiller, images, targets)
    assert set(losses) == DETECTOR_LOSSES | {"loss_fitnet"}  # kd_weight 0: no KD term
    ref_losses, s_feats, t_feats, _, _, _ = reference_values
    manual = 0.0
    for name in ("0", "pool"):
        conv = distiller.regressor[name]
        regressed = F.conv2d(s_feats[name], conv.weight, conv.bias)
        manual = manual + ((regressed - t_feats[name]) ** 2).mean()
    torch.testing.assert_close(losses["loss_fitnet"], 3.0 * manual, rtol=1e-5, atol=1e-7)
    for name in DETECTOR_LOSSES:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-5, atol=1e-7)


def test_fitnet_detection_default_hints_every_level_and_names_bad_levels(pair):
    student, teacher, _, _ = pair
    assert list(FitNet(student, teacher, task=TASK).regressor) == ["0", "1", "2", "3", "pool"]
    with pytest.raises(UserInputError, match=r"fitnet.fpn_levels=\['p9'\]: the FPN levels both detectors have are "
                                             r"\['0', '1', '2', '3', 'pool'\]"):
        FitNet(student, teacher, {"fpn_levels": ["p9"]}, task=TASK)


def test_fitnet_detection_hint_stage_trains_the_backbone_and_regressors(pair):
    student, teacher, images, targets = pair
    distiller = FitNet(student, teacher, {"hint_stage_epochs": 1}, task=TASK)
    hint_stage = distiller.training_stages()[0]
    params = {id(p) for p in distiller.trainable_parameters(hint_stage)}
    backbone = {id(p) for p in student.backbone.parameters() if p.requires_grad}
    regressor = {id(p) for p in distiller.regressor.parameters()}
    assert params == backbone | regressor
    distiller.train()
    torch.manual_seed(SEED)
    with torch.no_grad():
        _, losses = distiller.training_step(Batch(images, targets), Progress(epoch=1, epochs=2, stage="hint"))
    assert set(losses) == {"loss_fitnet"}


def test_detection_methods_hook_no_taps(pair):
    student, teacher, _, _ = pair
    for method in (ReviewKD, FitNet):
        distiller = method(student, teacher, task=TASK)
        assert distiller.student_taps == () and distiller.teacher_taps == ()
        assert not distiller.uses_teacher_features
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


@pytest.fixture(scope="module")
def trees_batch(tmp_path_factory):
    """One training batch of deepforest's tree-crown tiles (1 class + background), as the trainer gets it."""
    try:
        importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        if running_in_ci():
            pytest.fail("deepforest is not installed (pip install --no-deps deepforest)")
        pytest.skip("deepforest is not installed (pip install --no-deps deepforest)")
    cfg = DataConfig(dataset="trees", root=str(tmp_path_factory.mktemp("trees")), batch_size=2, test_batch_size=1,
                     subset=2, test_subset=1, num_workers=0, augment=False)
    bundle = build_detection_data(cfg, seed=0, device=torch.device("cpu"))
    assert bundle.num_classes == 2
    return next(iter(bundle.train))


@pytest.mark.parametrize(("method", "recipe", "distilled"), [
    (KD, {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0}, {"loss_kd"}),
    (DKD, DKD_RECIPE, {"loss_tckd", "loss_nckd"}),
    (ReviewKD, REVIEWKD_RECIPE, {"loss_reviewkd"}),
    (FitNet, {"feat_weight": 1.0}, {"loss_fitnet"}),
])
def test_one_training_step_on_the_trees_data(trees_batch, method, recipe, distilled):
    """One trainer-free SGD step of each method on real aerial images: finite losses of the expected names, a gradient
    for every parameter the method adds, a step that moves the student's ROI classifier and leaves the teacher."""
    torch.manual_seed(0)
    student = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=2, min_size=160, max_size=200)
    teacher = create_model("fasterrcnn_resnet18_fpn", num_classes=2, min_size=160, max_size=200)
    distiller = method(student, teacher, recipe, task=TASK)
    distiller.train()
    params = list(distiller.trainable_parameters(distiller.training_stages()[-1]))
    optimiser = torch.optim.SGD(params, lr=0.01)
    before = {n: p.detach().clone() for n, p in distiller.named_parameters() if p.requires_grad}
    _, losses = distiller.training_step(trees_batch, Progress(epoch=1, epochs=1))
    assert set(losses) == DETECTOR_LOSSES | distilled
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    optimiser.zero_grad()
    sum(losses.values()).backward()
    extra = {n: p for n, p in distiller.named_parameters() if not n.startswith(("student.", "teacher."))}
    assert (len(extra) > 0) == (method in (ReviewKD, FitNet))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra.values())
    optimiser.step()
    moved = {n for n, p in distiller.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert "student.roi_heads.box_predictor.cls_score.weight" in moved
    assert not any(n.startswith("teacher.") for n in moved)

"""CWD on the detection task: the FPN levels of student and teacher, against an independent re-statement of MMRazor's
``ChannelWiseDivergence`` (``mmrazor/models/losses/cwd.py``) applied as its ``configs/distill/mmdet/cwd/
cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py`` does: one loss per neck output (``data_idx`` 0..4), tau 1, weight 10, summed
with the student's own losses. Loss values and gradients on fixed random FPN maps, one training step of RetinaNet, FCOS
and Faster R-CNN students, the level matching rules and the config checks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from kdzoo.config.loader import config_from_dict
from kdzoo.errors import UserInputError
from kdzoo.methods.cwd import CWD, fpn_channel_wise_divergence, matched_fpn_levels
from kdzoo.models.detection import DetectorOutputs
from kdzoo.models.registry import create_model
from kdzoo.models.taps import Outputs
from kdzoo.types import DETECTION, SEGMENTATION, Batch, Progress, TaskSpec

TASK = TaskSpec(DETECTION)
TASK_SEGMENTATION = TaskSpec(SEGMENTATION)
NUM_CLASSES = 3  # background + 2
SEED = 7
RETINA_LEVELS = ["0", "1", "2", "p6", "p7"]
# The sizes torchvision's RetinaNet FPN gives a 128x160 batch: P3..P7 (strides 8..128).
RETINA_SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
OWN_LOSSES = {
    "retinanet_resnet50_fpn": {"classification", "bbox_regression"},
    "fcos_resnet50_fpn": {"classification", "bbox_regression", "bbox_ctrness"},
    "fasterrcnn_resnet18_fpn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}


def mmrazor_channel_wise_divergence(preds_s, preds_t, tau, loss_weight):
    """MMRazor ``ChannelWiseDivergence.forward``: [N*C, H*W] rows, sum of p_T log p_T - p_T log p_S, times tau^2,
    times the weight, divided by C * N."""
    n, c, h, w = preds_s.shape
    rows_s, rows_t = preds_s.reshape(-1, h * w) / tau, preds_t.reshape(-1, h * w) / tau
    p_t = torch.softmax(rows_t, dim=1)
    total = torch.sum(p_t * torch.log_softmax(rows_t, dim=1) - p_t * torch.log_softmax(rows_s, dim=1)) * tau**2
    return loss_weight * total / (c * n)


def reference_fpn_cwd(student_levels, teacher_levels, tau, loss_weight):
    """MMRazor's detection config: one weighted ChannelWiseDivergence per FPN level, the named losses summed."""
    return sum(mmrazor_channel_wise_divergence(s, t, tau, loss_weight)
               for s, t in zip(student_levels, teacher_levels, strict=True))


def tiny_batch():
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 160, generator=gen), torch.rand(3, 120, 150, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0], [80.0, 30.0, 150.0, 110.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[20.0, 20.0, 100.0, 100.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def detector(name, seed):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, min_size=128, max_size=160)
    if name.startswith("fasterrcnn"):  # fewer proposals than torchvision's 2000 / 512 keep the step fast
        model.rpn._pre_nms_top_n = model.rpn._post_nms_top_n = {"training": 200, "testing": 200}
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    return model


@pytest.fixture(scope="module")
def retina_pair():
    return detector("retinanet_resnet50_fpn", 0), detector("retinanet_resnet50_fpn", 1)


def fpn_outputs(levels, own_losses=None):
    fpn = OrderedDict(zip(RETINA_LEVELS, levels, strict=True))
    return Outputs(logits=torch.zeros(0), task_losses=own_losses, detector=DetectorOutputs(None, OrderedDict(), fpn))


def random_levels(gen, sizes, channels=256):
    return [torch.randn(2, channels, h, w, generator=gen) * 3 for h, w in sizes]


@pytest.mark.parametrize(("recipe", "tau", "weight", "ce_weight"), [
    ({}, 1.0, 10.0, 1.0),  # MMRazor's mmdet config: tau=1, loss_weight=10 per level
    ({"tau": 2.0, "cwd_weight": 3.0, "ce_weight": 0.5}, 2.0, 3.0, 0.5),
])
def test_loss_and_gradients_equal_mmrazor_summed_over_the_levels(retina_pair, recipe, tau, weight, ce_weight):
    student, teacher = retina_pair
    distiller = CWD(student, teacher, recipe, task=TASK)
    assert distiller.fpn_levels == RETINA_LEVELS and distiller.term_weight() == weight
    gen = torch.Generator().manual_seed(5)
    student_levels = [level.requires_grad_(True) for level in random_levels(gen, RETINA_SIZES)]
    teacher_levels = random_levels(gen, RETINA_SIZES)
    own = {"classification": torch.tensor(0.75), "bbox_regression": torch.tensor(0.25)}
    losses = distiller.compute_losses(fpn_outputs(student_levels, own), fpn_outputs(teacher_levels),
                                      Batch(*tiny_batch()), Progress())
    assert set(losses) == {"classification", "bbox_regression", "loss_cwd"}
    assert losses["classification"].item() == pytest.approx(0.75 * ce_weight)
    assert losses["bbox_regression"].item() == pytest.approx(0.25 * ce_weight)
    expected = reference_fpn_cwd(student_levels, teacher_levels, tau, weight)
    assert expected > 1.0  # far-apart maps: a real divergence, not ~0
    torch.testing.assert_close(losses["loss_cwd"], expected, rtol=1e-6, atol=0.0)
    grads = torch.autograd.grad(losses["loss_cwd"], student_levels)
    ref_grads = torch.autograd.grad(expected, student_levels)
    for name, g, rg in zip(RETINA_LEVELS, grads, ref_grads, strict=True):
        assert rg.abs().max() > 0
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-9, msg=lambda m, n=name: f"level {n}: {m}")


def test_a_student_level_of_another_size_is_resized_bilinearly_to_the_teachers():
    gen = torch.Generator().manual_seed(2)
    student_map = torch.randn(2, 8, 5, 6, generator=gen)
    teacher_map = torch.randn(2, 8, 10, 12, generator=gen)
    value = fpn_channel_wise_divergence({"0": student_map}, {"0": teacher_map}, ["0"], tau=1.0)
    resized = F.interpolate(student_map, size=(10, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(value, mmrazor_channel_wise_divergence(resized, teacher_map, 1.0, 1.0), rtol=1e-6,
                               atol=0.0)


def test_cwd_on_detection_hooks_no_taps_and_levels_are_chosen_by_name(retina_pair):
    student, teacher = retina_pair
    distiller = CWD(student, teacher, {"fpn_levels": ["p7", "0"]}, task=TASK)
    assert distiller.fpn_levels == ["p7", "0"]
    assert distiller.student_taps == () and distiller.teacher_taps == () and not distiller.uses_teacher_features
    assert distiller.num_extra_parameters() == 0  # no connector, as MMRazor
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())
    with pytest.raises(UserInputError, match=r"cwd.fpn_levels=\['pool'\]: the FPN levels both detectors have are "
                                             r"\['0', '1', '2', 'p6', 'p7'\]"):
        CWD(student, teacher, {"fpn_levels": ["pool"]}, task=TASK)


def test_level_matching_refuses_other_widths_and_other_strides():
    faster = {"0": (1, 256, 16, 16), "1": (1, 256, 8, 8), "2": (1, 256, 4, 4), "3": (1, 256, 2, 2),
              "pool": (1, 256, 1, 1)}
    retina = {"0": (1, 256, 8, 8), "1": (1, 256, 4, 4), "2": (1, 256, 2, 2), "p6": (1, 256, 1, 1),
              "p7": (1, 256, 1, 1)}
    assert matched_fpn_levels(faster, faster, None) == ["0", "1", "2", "3", "pool"]
    fewer = {name: shape for name, shape in faster.items() if name != "pool"}
    assert matched_fpn_levels(fewer, faster, None) == ["0", "1", "2", "3"]  # only the levels both have
    with pytest.raises(UserInputError, match=r"FPN level '0' is 8x8 in the student but 16x16 in the teacher"):
        matched_fpn_levels(retina, faster, None)
    narrow = {**faster, "1": (1, 128, 8, 8)}
    with pytest.raises(UserInputError, match=r"level '1' .* student's has 128 channels and the teacher's 256"):
        matched_fpn_levels(narrow, faster, ["0", "1"])
    with pytest.raises(UserInputError, match=r"cwd.fpn_levels=\[\]"):
        matched_fpn_levels(faster, faster, [])


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_resnet18_fpn"])
def test_one_training_step(name):
    """The detector's own losses equal torchvision's ``student(images, targets)``, ``loss_cwd`` equals MMRazor's sum on
    both backbones' FPN levels of the same images, and one SGD step moves the student's FPN but not the teacher."""
    student, teacher = detector(name, 0), detector(name, 1)
    images, targets = tiny_batch()
    distiller = CWD(student, teacher, task=TASK)
    distiller.train()
    torch.manual_seed(SEED)
    _, losses = distiller.training_step(Batch(images, targets), Progress(epoch=1, epochs=1))
    assert set(losses) == OWN_LOSSES[name] | {"loss_cwd"}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    with torch.no_grad():
        torch.manual_seed(SEED)
        own = student(images, targets)
        torch.manual_seed(SEED)
        student_fpn = student.backbone(student.transform(images, [dict(t) for t in targets])[0].tensors)
        teacher_fpn = teacher.backbone(teacher.transform(images)[0].tensors)
    for key in OWN_LOSSES[name]:
        torch.testing.assert_close(losses[key], own[key], rtol=1e-5, atol=1e-7)
    assert list(student_fpn) == distiller.fpn_levels and len(student_fpn) == 5
    expected = reference_fpn_cwd(list(student_fpn.values()), list(teacher_fpn.values()), 1.0, 10.0)
    torch.testing.assert_close(losses["loss_cwd"], expected, rtol=1e-5, atol=1e-7)
    assert expected > 0
    fpn_params = list(student.backbone.fpn.parameters())
    assert all(g is not None and g.abs().sum() > 0
               for g in torch.autograd.grad(losses["loss_cwd"], fpn_params, retain_graph=True))
    optimiser = torch.optim.SGD(list(distiller.trainable_parameters(distiller.training_stages()[-1])), lr=0.01)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fpn_before = [p.detach().clone() for p in fpn_params]
    optimiser.zero_grad()
    sum(losses.values()).backward()
    optimiser.step()
    assert all(not torch.equal(p, before) for p, before in zip(fpn_params, fpn_before, strict=True))
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_segmentation_keeps_mmrazor_weight_5_on_the_class_score_maps():
    torch.manual_seed(0)
    student = create_model("deeplabv3plus_mobilenetv2", num_classes=NUM_CLASSES)
    teacher = create_model("deeplabv3plus_mobilenetv2", num_classes=NUM_CLASSES)
    distiller = CWD(student, teacher, input_shape=(3, 32, 32), task=TASK_SEGMENTATION)
    assert distiller.term_weight() == 5.0 and distiller.student_taps == ("dense_logits",)
    distiller.train()
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 32, 32, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=gen)
    with torch.no_grad():
        student_out = distiller.student_extractor(image)
        teacher_out = distiller.teacher_forward(Batch(image, target))
        losses = distiller.compute_losses(student_out, teacher_out, Batch(image, target), Progress())
    assert set(losses) == {"loss_ce", "loss_cwd"}
    expected = mmrazor_channel_wise_divergence(student_out.dense_logits, teacher_out.dense_logits, 1.0, 5.0)
    torch.testing.assert_close(losses["loss_cwd"], expected, rtol=1e-6, atol=0.0)


def _detection_config(method):
    return {"task": "detection", "data": {"dataset": "trees", "num_workers": 0},
            "student": {"name": "retinanet_resnet50_fpn"},
            "teacher": {"name": "retinanet_resnet50_fpn", "checkpoint": "teacher.pth"}, "method": method}


def test_config_accepts_cwd_on_detection_and_still_refuses_it_on_classification():
    cfg = config_from_dict(_detection_config({"name": "cwd", "fpn_levels": ["0", "p7"]}))
    assert cfg.task == DETECTION and cfg.method["fpn_levels"] == ["0", "p7"]
    with pytest.raises(UserInputError, match="fpn_level"):
        config_from_dict(_detection_config({"name": "cwd", "fpn_level": ["0"]}))
    classification = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet32x4", "checkpoint": "t.pth"},
                      "method": {"name": "cwd"}}
    with pytest.raises(UserInputError, match="method 'cwd' is defined for segmentation, detection, not classification"):
        config_from_dict(classification)

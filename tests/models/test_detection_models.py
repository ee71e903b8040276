"""Detection zoo and the detector contract (kdzoo/models/detection/): parameter counts, FrozenBN bodies, checkpoint
layouts, the taps forward against torchvision's own, teacher ROI logits on the student's proposals.

Small on purpose: 128-pixel images, min_size/max_size 128 (96 for the rescaled teacher), a handful of classes."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from kdzoo.errors import CheckpointError, UserInputError
from kdzoo.models import count_parameters, create_model, features, list_models
from kdzoo.models.checkpoint import load_checkpoint
from kdzoo.models.detection import (
    detector_forward_with_taps,
    load_detection_checkpoint,
    roi_logits_for,
    teacher_forward_with_taps,
    upgrade_detection_state_dict,
)
from kdzoo.models.taps import get_tap_spec
from tests.models.conftest import randomize_norms

NAMES = ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet101_fpn",
         "fasterrcnn_mobilenet_v2_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
# 91 classes. torchvision's weight metadata (num_params) says the same for its three builders: 41,755,286
# (fasterrcnn_resnet50_fpn), 34,014,999 (retinanet_resnet50_fpn), 32,269,600 (fcos_resnet50_fpn).
PARAMS = {"fasterrcnn_resnet18_fpn": 28_730_006, "fasterrcnn_resnet50_fpn": 41_755_286,
          "fasterrcnn_resnet101_fpn": 60_695_190, "fasterrcnn_mobilenet_v2_fpn": 19_218_326,
          "retinanet_resnet50_fpn": 34_014_999, "fcos_resnet50_fpn": 32_269_600}
SMALL = {"min_size": 128, "max_size": 128}
TINY = {"min_size": 64, "max_size": 64}  # the ResNet-50 models: the CPU cost is in their forwards


def _images() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, 128, 128, generator=gen), torch.rand(3, 112, 128, generator=gen)]


def _targets() -> list[dict[str, Tensor]]:
    return [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 30.0, 100.0, 100.0]]),
             "labels": torch.tensor([1, 3])},
            {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return create_model("fasterrcnn_resnet18_fpn", num_classes=5, **SMALL)


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(1)
    return create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=5, min_size=96, max_size=96)


# --------------------------------------------------------------------------------------------------- zoo


def test_registered_detectors_and_parameter_counts() -> None:
    assert {e.name for e in list_models("detection")} == set(NAMES)
    for name in NAMES:
        with torch.device("meta"):
            model = create_model(name, num_classes=91)
        assert count_parameters(model) == PARAMS[name], name
        # torchvision builds the body with FrozenBatchNorm2d when it starts from ImageNet weights: no BN statistics move
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules()), name
        assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules()), name


def test_trainable_backbone_layers_freeze_from_the_bottom() -> None:
    with torch.device("meta"):
        r18 = create_model("fasterrcnn_resnet18_fpn", num_classes=3)
        mv2 = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=3)
        mv2_all = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=3, trainable_backbone_layers=5)

    def trainable(model: nn.Module) -> set[str]:
        body = model.backbone.body
        return {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}

    assert trainable(r18) == {"layer2", "layer3", "layer4"}  # torchvision's default 3
    blocks = {int(b) for b in trainable(mv2)}
    assert blocks == set(range(4, 18))  # m3, m4, m5 trainable; stem and m2 frozen
    assert all(p.requires_grad for p in mv2_all.parameters())  # mdistiller's MV2 student (FREEZE_AT 0)
    with pytest.raises(UserInputError, match=r"trainable_backbone_layers must be an integer in \[0, 5\]"):
        create_model("fasterrcnn_resnet18_fpn", trainable_backbone_layers=6)


def test_mobilenet_v2_fpn_has_five_levels_on_m2_to_m5(mobilenet) -> None:
    mobilenet.eval()
    images = [torch.rand(3, 96, 96)]
    out = teacher_forward_with_taps(mobilenet, images)
    assert list(out.fpn) == ["0", "1", "2", "3", "pool"]
    assert [v.shape[-1] for v in out.fpn.values()] == [24, 12, 6, 3, 2]  # strides 4, 8, 16, 32, 64 on 96 pixels
    assert [v.shape[1] for v in out.stages.values()] == [24, 32, 96, 320]
    assert all(v.shape[1] == 256 for v in out.fpn.values())
    # the hook taps read the same body maps (the model's eval forward transforms the raw images itself)
    with torch.no_grad():
        tapped = features(mobilenet, torch.stack(images), ("feats",))
    assert get_tap_spec(mobilenet).signed
    for tap, stage in zip(tapped.feats[1:], out.stages.values(), strict=True):
        assert torch.equal(tap, stage)


# --------------------------------------------------------------------------------------------------- checkpoints


def _legacy(sd: OrderedDict[str, Tensor]) -> dict[str, Tensor]:
    """The published fasterrcnn_resnet50_fpn_coco-258fb6c6.pth layout: saved from a FrozenBN model (no
    num_batches_tracked) before torchvision wrapped the FPN and RPN-head convs in Conv2dNormActivation."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        out[key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = value
    return out  # a plain dict: no version metadata, as in files from before the rename


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A randomly initialised torchvision fasterrcnn_resnet50_fpn (91 classes) written in the published COCO layout
    and as a torchvision references/detection checkpoint ``{"model": ..., "epoch": ...}`` of the current layout."""
    torch.manual_seed(3)
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, **TINY)
    reference = randomize_norms(reference).eval()
    sd = reference.state_dict()
    folder = tmp_path_factory.mktemp("coco")
    torch.save(_legacy(sd), folder / "coco-legacy.pth")
    current = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    torch.save({"model": current, "epoch": 25}, folder / "references.pth")
    return reference, folder / "coco-legacy.pth", folder / "references.pth"


def test_torchvision_coco_layouts_load_strictly(coco_files) -> None:
    reference, legacy_path, references_path = coco_files
    sd = reference.state_dict()
    legacy = torch.load(legacy_path, weights_only=True)
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "rpn.head.conv.weight" in legacy

    model = create_model("fasterrcnn_resnet50_fpn", num_classes=91, **TINY)
    # torchvision's own (BatchNorm2d) state: counters dropped for the FrozenBN body, keys as the model names them
    assert list(upgrade_detection_state_dict(model, _legacy(sd))) == list(model.state_dict())
    assert list(upgrade_detection_state_dict(model, sd)) == list(model.state_dict())

    assert load_detection_checkpoint(model, legacy_path)["path"] == str(legacy_path)
    loaded = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.items())
    assert load_detection_checkpoint(model, references_path)["epoch"] == 25
    assert load_checkpoint(model, references_path)["epoch"] == 25  # the current layout passes kdzoo's generic loader
    # ...and so does the legacy one: the detectors register their key upgrade with it (teacher.checkpoint's path)
    fresh = create_model("fasterrcnn_resnet50_fpn", num_classes=91, **TINY)
    load_checkpoint(fresh, legacy_path)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())

    # same numbers as torchvision's model with those weights (its eval BatchNorm2d computes FrozenBatchNorm2d's affine)
    model.eval()
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        ours = teacher_forward_with_taps(model, image).fpn
        theirs = reference.backbone(reference.transform(image)[0].tensors)
    for key in theirs:
        scale = theirs[key].abs().max().item()  # randomised statistics make activations large
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5 * scale)


def test_from_scratch_norm_and_slim_heads() -> None:
    """``norm: bn`` = trainable BatchNorm2d in the body; ``fpn_channels`` / ``box_representation_size`` /
    ``box_batch_size_per_image`` size the FPN, the box head and the ROI sampler as torchvision's own arguments do."""
    torch.manual_seed(0)
    model = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=3, norm="bn", trainable_backbone_layers=5,
                         fpn_channels=32, box_representation_size=64, box_batch_size_per_image=16, **SMALL)
    body_norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)]
    assert body_norms and all(type(m) is nn.BatchNorm2d for m in body_norms)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    assert model.backbone.out_channels == 32 and model.rpn.head.conv[0][0].in_channels == 32
    assert model.roi_heads.box_head.fc6.in_features == 32 * 7 * 7 and model.roi_heads.box_head.fc7.out_features == 64
    assert model.roi_heads.box_predictor.cls_score.weight.shape == (3, 64)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    model.train()
    losses = model(_images(), [{**t, "labels": t["labels"].clamp(max=2)} for t in _targets()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    levels = teacher_forward_with_taps(model.eval(), _images()).fpn
    assert [v.shape[1] for v in levels.values()] == [32] * 5
    default = create_model("fasterrcnn_resnet18_fpn", num_classes=91)
    assert count_parameters(default) == PARAMS["fasterrcnn_resnet18_fpn"]  # the defaults stay torchvision's
    with pytest.raises(UserInputError, match="norm must be one of"):
        create_model("fasterrcnn_resnet18_fpn", norm="gn", **SMALL)
    with pytest.raises(UserInputError, match="fpn_channels must be a positive integer"):
        create_model("fasterrcnn_resnet18_fpn", fpn_channels=0, **SMALL)


def test_detection_checkpoint_of_another_model_is_refused(coco_files) -> None:
    _, legacy_path, _ = coco_files
    with pytest.raises(CheckpointError, match=r"shape mismatch.*cls_score\.weight file \[91, 1024\] vs model "
                                              r"\[5, 1024\].*num_classes"):
        load_detection_checkpoint(create_model("fasterrcnn_resnet50_fpn", num_classes=5, **SMALL), legacy_path)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): backbone\.body\.layer1\.0\.conv3\.weight"):
        load_detection_checkpoint(create_model("fasterrcnn_resnet18_fpn", num_classes=91, **SMALL), legacy_path)
    with pytest.raises(CheckpointError, match="is a whole detector: load it with .*load_detection_checkpoint"):
        create_model("fasterrcnn_resnet50_fpn", backbone_checkpoint=str(legacy_path), **SMALL)


def test_backbone_checkpoint_loads_imagenet_body_strictly(tmp_path: Path) -> None:
    torch.manual_seed(4)
    resnet18 = randomize_norms(torchvision.models.resnet18(weights=None))
    torch.save(resnet18.state_dict(), tmp_path / "resnet18.pth")  # with fc and num_batches_tracked
    model = create_model("fasterrcnn_resnet18_fpn", num_classes=3, backbone_checkpoint=str(tmp_path / "resnet18.pth"),
                         **SMALL)
    body = model.backbone.body.state_dict()
    reference = resnet18.state_dict()
    assert body and all(torch.equal(v, reference[k]) for k, v in body.items())
    assert torch.equal(body["layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])

    mv2 = torchvision.models.mobilenet_v2(weights=None)
    torch.save(mv2.state_dict(), tmp_path / "mobilenet_v2.pth")  # features.18 and classifier are ImageNet-only
    model = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=3,
                         backbone_checkpoint=str(tmp_path / "mobilenet_v2.pth"), **SMALL)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["17.conv.2.weight"], mv2.state_dict()["features.17.conv.2.weight"])

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(CheckpointError, match=r"does not fit this detector's ResNet body.*unexpected key\(s\): "
                                              r"layer1\.2\.conv1\.weight"):
        create_model("fasterrcnn_resnet18_fpn", backbone_checkpoint=str(tmp_path / "resnet34.pth"), **SMALL)
    with pytest.raises(CheckpointError, match=r"MobileNetV2 body.*missing key\(s\): features\.0\.0\.weight"):
        create_model("fasterrcnn_mobilenet_v2_fpn", backbone_checkpoint=str(tmp_path / "resnet18.pth"), **SMALL)


# --------------------------------------------------------------------------------------------------- the contract


def test_taps_forward_equals_torchvision_forward(student) -> None:
    student.train()
    images, targets = _images(), _targets()
    torch.manual_seed(7)
    expected = student(images, targets)
    calls: dict[str, int] = {}
    watched = ("backbone.body", "backbone.fpn", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head",
               "roi_heads.box_predictor")

    def count(name: str):  # noqa: ANN202 - a hook
        return lambda *_args: calls.__setitem__(name, calls.get(name, 0) + 1)

    handles = [student.get_submodule(n).register_forward_hook(count(n)) for n in watched]
    try:
        torch.manual_seed(7)
        out = detector_forward_with_taps(student, images, targets)
    finally:
        for h in handles:
            h.remove()
    assert calls == dict.fromkeys(watched, 1)  # nothing runs twice
    assert list(out.losses) == list(expected)
    for key, value in expected.items():
        assert torch.equal(out.losses[key], value), key

    assert out.images.image_sizes == [(128, 128), (112, 128)] and out.images.tensors.shape == (2, 3, 128, 128)
    assert list(out.fpn) == ["0", "1", "2", "3", "pool"] and list(out.stages) == ["0", "1", "2", "3"]
    assert [v.shape[1] for v in out.stages.values()] == [64, 128, 256, 512]
    sizes = [len(p) for p in out.proposals]
    assert sizes == [len(lbl) for lbl in out.proposal_labels] and sum(sizes) == out.class_logits.shape[0]
    assert out.class_logits.shape[1] == 5 and out.box_regression.shape == (sum(sizes), 20)
    assert sizes == [512, 512]  # torchvision's batch_size_per_image
    labels = torch.cat(out.proposal_labels)
    assert torch.equal(F.cross_entropy(out.class_logits, labels), out.losses["loss_classifier"])
    assert set(out.proposal_labels[0].tolist()) == {0, 1, 3} and set(out.proposal_labels[1].tolist()) == {0, 2}
    assert out.class_logits.requires_grad


def test_multiscale_training_draws_the_same_size_in_both_forwards() -> None:
    """torchvision draws the training min size from the RNG before the RPN samples: the taps forward must consume
    the RNG in the same order (mdistiller trains at a min size drawn from 640..800)."""
    torch.manual_seed(0)
    model = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=5, min_size=[64, 80, 96], max_size=96).train()
    drawn = set()
    for seed in (0, 1, 2, 3):
        torch.manual_seed(seed)
        expected = model(_images(), _targets())
        torch.manual_seed(seed)
        out = detector_forward_with_taps(model, _images(), _targets())
        assert all(torch.equal(out.losses[k], v) for k, v in expected.items())
        drawn.add(out.images.image_sizes[0][0])
    assert drawn <= {64, 80, 96} and len(drawn) > 1


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_one_stage_taps_forward_equals_torchvision_forward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **TINY).train()
    images, targets = _images(), _targets()
    torch.manual_seed(2)
    expected = model(images, targets)
    torch.manual_seed(2)
    out = detector_forward_with_taps(model, images, targets)
    assert list(out.losses) == list(expected) and all(torch.equal(out.losses[k], v) for k, v in expected.items())
    assert list(out.fpn) == ["0", "1", "2", "p6", "p7"] and out.proposals is None
    assert out.head_outputs["cls_logits"].shape[-1] == 4


def test_teacher_roi_logits_on_student_proposals(student, mobilenet) -> None:
    """A teacher resizing to 96 pixels classifies the student's (128-pixel frame) sampled proposals: same count and
    order, and the same logits as torchvision's own RoIHeads forward on the hand-rescaled boxes."""
    student.train()
    teacher = mobilenet.eval()
    images = _images()
    torch.manual_seed(11)
    out = detector_forward_with_taps(student, images, _targets())
    logits = roi_logits_for(teacher, images, out.proposals, out.images.image_sizes)
    assert logits.shape == (out.class_logits.shape[0], 5) and not logits.requires_grad

    with torch.no_grad():
        batch, _ = teacher.transform(images)
        assert batch.image_sizes == [(96, 96), (84, 96)]
        levels = teacher.backbone(batch.tensors)
        scaled = []
        for boxes, (hs, ws), (ht, wt) in zip(out.proposals, out.images.image_sizes, batch.image_sizes, strict=True):
            scaled.append(boxes * torch.tensor([wt / ws, ht / hs, wt / ws, ht / hs]))
        captured: list[Tensor] = []
        handle = teacher.roi_heads.box_predictor.cls_score.register_forward_hook(lambda _m, _i, o: captured.append(o))
        try:
            teacher.roi_heads(levels, scaled, batch.image_sizes)
        finally:
            handle.remove()
    torch.testing.assert_close(logits, captured[0], rtol=1e-5, atol=1e-5)

    teacher.train()
    with pytest.raises(ValueError, match="teacher must be in eval mode"):
        roi_logits_for(teacher, images, out.proposals, out.images.image_sizes)
    teacher.eval()


def test_eval_forward_returns_detections_in_image_pixels(student) -> None:
    student.eval()
    student.roi_heads.score_thresh = 0.0  # a random head scores every class near 1 / num_classes
    try:
        with torch.no_grad():
            detections = student(_images())
    finally:
        student.roi_heads.score_thresh = 0.05
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(128, 128), (112, 128)], strict=True):
        assert set(det) == {"boxes", "labels", "scores"} and len(det["boxes"]) > 0
        boxes = det["boxes"]
        assert boxes.shape[1] == 4 and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes >= 0).all()
        assert det["labels"].min() >= 1 and det["labels"].max() <= 4
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()


def test_bad_targets_and_models_are_user_errors(student) -> None:
    student.train()
    bad = _targets()
    bad[1]["boxes"] = torch.tensor([[50.0, 5.0, 20.0, 40.0]])
    with pytest.raises(UserInputError, match=r"target 1: every box needs positive width and height"):
        detector_forward_with_taps(student, _images(), bad)
    bad[1]["boxes"] = torch.tensor([[5, 5, 50, 40]])
    with pytest.raises(UserInputError, match=r"target 1: 'boxes' must be a float tensor"):
        detector_forward_with_taps(student, _images(), bad)
    with pytest.raises(UserInputError, match=r"0 < min_size <= max_size.*min_size=\[600, 900\], max_size=800"):
        create_model("fasterrcnn_resnet18_fpn", min_size=[600, 900], max_size=800)
    with pytest.raises(UserInputError, match="not a torchvision Faster R-CNN"):
        detector_forward_with_taps(nn.Linear(2, 2), _images(), _targets())


def test_torchvision_prefixed_detectors_build_offline_with_taps() -> None:
    with torch.device("meta"):
        model = create_model("torchvision:fasterrcnn_resnet50_fpn", num_classes=3)
    spec = get_tap_spec(model)
    assert spec.stem.module == "backbone.body.relu" and spec.classifier == "roi_heads.box_predictor.cls_score"
    assert [t.module for t in spec.stages] == [f"backbone.body.layer{i}" for i in (1, 2, 3, 4)]

"""CAT-KD against an independent re-statement of the reference (GzyAftermath/CAT-KD ``CAT_loss`` on its
converted ``ResNet_test``/``WideResNet_test`` models: a bias-free 1x1 conv classifier on the last map,
CAMs pooled to r x r, MSE), loss and gradients; the student's bias-free head; other architectures; errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.catkd import linear_classifier
from kdzoo.types import Batch, Progress


def _pair(teacher="resnet32x4", student="resnet8x4", seed=0):
    torch.manual_seed(seed)
    return kdzoo.create_model(teacher, num_classes=100), kdzoo.create_model(student, num_classes=100)


def _reference_cams(model, images):
    """ResNet_test.forward up to ``conv_test``: the classifier weight as a bias-free 1x1 conv on layer3."""
    h = model.relu(model.bn1(model.conv1(images)))
    h = model.layer3(model.layer2(model.layer1(h)))
    return F.conv2d(h, model.fc.weight[:, :, None, None])


@pytest.mark.parametrize("normalize", [False, True])
def test_loss_and_gradients_match_the_reference_formulation(normalize):
    teacher, student = _pair()
    distiller = kdzoo.create_distiller("catkd", teacher=teacher, student=student, normalize=normalize)
    distiller.train()
    images, target = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    _, losses = distiller.training_step(Batch(images, target), Progress(epoch=1))
    assert set(losses) == {"loss_ce", "loss_cat"}
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    with torch.no_grad():
        cams_t = _reference_cams(teacher.eval(), images)
    cams_s = _reference_cams(student, images)  # train mode, as in the step above
    pooled_s, pooled_t = F.adaptive_avg_pool2d(cams_s, 2), F.adaptive_avg_pool2d(cams_t, 2)
    if normalize:
        pooled_s, pooled_t = F.normalize(pooled_s, dim=(2, 3)), F.normalize(pooled_t, dim=(2, 3))
    ref_cat = 15.0 * F.mse_loss(pooled_s, pooled_t)
    ref_ce = F.cross_entropy(cams_s.mean((2, 3)), target)  # ResNet_test logits: avgpool of the CAMs
    torch.testing.assert_close(losses["loss_cat"].detach(), ref_cat.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_ce"].detach(), ref_ce.detach(), rtol=1e-5, atol=1e-7)
    (ref_cat + ref_ce).backward()
    assert grads.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    assert "fc.bias" not in grads  # fixed at zero, like the reference's bias-free head
    for name, grad in grads.items():
        expected = student.get_parameter(name).grad
        rel = ((grad - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (name, rel)


def test_student_head_is_bias_free_and_logits_are_the_mean_cam():
    teacher, student = _pair()
    student.fc.bias.data.fill_(0.3)
    distiller = kdzoo.create_distiller("catkd", teacher=teacher, student=student)
    assert torch.equal(student.fc.bias, torch.zeros(100)) and not student.fc.bias.requires_grad
    assert all(p is not student.fc.bias for g in distiller.param_groups(distiller.stages()[-1]) for p in g["params"])
    assert teacher.fc.bias.abs().sum() > 0  # the teacher is untouched; its bias just never enters a CAM
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(images), _reference_cams(student, images).mean((2, 3)),
                                   rtol=1e-5, atol=1e-6)
    cfg = distiller.cfg
    assert (cfg.cat_weight, cfg.cam_resolution, cfg.normalize) == (15.0, 2, False)
    assert (cfg.ce_weight, cfg.kd_weight) == (1.0, 0.0)
    assert distiller.num_extra_parameters() == 0


@pytest.mark.parametrize(("teacher", "student"), [("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV2"),
                                                  ("vgg13", "MobileNetV2"), ("resnet56", "resnet20")])
def test_other_architectures_use_the_map_before_global_pooling(teacher, student):
    t, s = _pair(teacher, student)
    distiller = kdzoo.create_distiller("catkd", teacher=t, student=s, cat_weight=1.0)
    distiller.train()
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    _, losses = distiller.training_step(Batch(images, target), Progress(epoch=1))
    # WRN: the final BN+ReLU; ShuffleV2/MobileNetV2: the last 1x1 conv; then the bias-free classifier.
    with torch.no_grad():
        out = kdzoo.features(t.eval(), images, ("prepool",))
        cams = F.conv2d(F.adaptive_avg_pool2d(out.prepool, 2), linear_classifier(t, "teacher").weight[..., None, None])
    s_out = distiller.student_extractor(images)  # train mode again: the same batch statistics
    s_head = linear_classifier(s, "student")
    s_cams = F.conv2d(F.adaptive_avg_pool2d(s_out.prepool, 2), s_head.weight[..., None, None])
    assert s_out.prepool.shape[1] == s_head.in_features
    assert losses["loss_cat"].item() == pytest.approx(F.mse_loss(s_cams, cams).item(), rel=1e-5)
    losses["loss_cat"].backward()


def test_errors():
    teacher, student = _pair()
    with pytest.raises(UserInputError, match="cam_resolution must be >= 1"):
        kdzoo.create_distiller("catkd", teacher=teacher, student=student, cam_resolution=0)
    ten_classes = kdzoo.create_model("resnet8x4", num_classes=10)
    with pytest.raises(UserInputError, match="student has 10 classes, the teacher 100"):
        kdzoo.create_distiller("catkd", teacher=teacher, student=ten_classes)

"""Segmentation zoo: OFD's DeepLabV3+ against an independent functional re-statement of the official model
(clovaai/overhaul-distillation Segmentation/modeling/{deeplab,aspp,decoder}.py, backbone/{resnet,mobilenet}.py),
checkpoint layouts of pytorch-deeplab-xception, ImageNet backbone files, torchvision's segmentation models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from kdzoo.errors import CheckpointError, UserInputError
from kdzoo.models import FeatureExtractor, count_parameters, create_model, features, load_checkpoint
from kdzoo.models.taps import ALL_GROUPS, bn_before_relu, probe_shapes

SD = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------- reference
# A functional restatement of the official forward / extract_feature, reading weights by their official keys.


def _conv(x: Tensor, sd: SD, key: str, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1):
    return F.conv2d(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"), stride, padding, dilation, groups)


def _bn(x: Tensor, sd: SD, key: str, train: bool) -> Tensor:
    if train:  # batch statistics (the running ones only move)
        return F.batch_norm(x, None, None, sd[f"{key}.weight"], sd[f"{key}.bias"], True, 0.1, 1e-5)
    return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                        sd[f"{key}.bias"], False, 0.1, 1e-5)


def _ref_resnet(x: Tensor, sd: SD, depth: int, os: int, train: bool):
    blocks = {18: (2, 2, 2, 2), 101: (3, 4, 23, 3)}[depth]
    strides, dils = ([1, 2, 2, 1], [1, 1, 1, 2]) if os == 16 else ([1, 2, 1, 1], [1, 1, 2, 4])
    x = F.relu(_bn(_conv(x, sd, "backbone.conv1", 2, 3), sd, "backbone.bn1", train))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = []
    for i in range(4):
        for j in range(blocks[i]):
            d = dils[i] * ((1, 2, 4)[j] if depth > 18 and i == 3 else 1)
            s = strides[i] if j == 0 else 1
            p = f"backbone.layer{i + 1}.{j}"
            inp = F.relu(x)
            if depth > 18:
                out = F.relu(_bn(_conv(inp, sd, f"{p}.conv1"), sd, f"{p}.bn1", train))
                out = F.relu(_bn(_conv(out, sd, f"{p}.conv2", s, d, d), sd, f"{p}.bn2", train))
                out = _bn(_conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3", train)
            else:
                out = F.relu(_bn(_conv(inp, sd, f"{p}.conv1", s, d, d), sd, f"{p}.bn1", train))
                out = _bn(_conv(out, sd, f"{p}.conv2", 1, d, d), sd, f"{p}.bn2", train)
            if f"{p}.downsample.0.weight" in sd:
                inp = _bn(_conv(inp, sd, f"{p}.downsample.0", s), sd, f"{p}.downsample.1", train)
            x = out + inp
        feats.append(x)
    return feats, F.relu(x), F.relu(feats[0])


def _ref_mobilenet(x: Tensor, sd: SD, os: int):
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    x = F.relu6(_bn(_conv(x, sd, "backbone.features.0.0", 2, 1), sd, "backbone.features.0.1", False))
    cfg, current, rate, inp = [], 2, 1, 32
    for t, c, n, s in settings:
        if current == os:
            stride, dil, rate = 1, rate, rate * s
        else:
            stride, dil, current = s, 1, current * s
        for i in range(n):
            cfg.append((inp, c, stride if i == 0 else 1, dil, t))
            inp = c
    ins = {}
    for k, (inp, oup, stride, d, t) in enumerate(cfg, start=1):
        ins[k] = x
        p = f"backbone.features.{k}.conv"
        h = F.pad(x, (d, d, d, d))  # fixed_padding, kernel 3
        hidden = inp * t
        idx = 0
        if t != 1:
            h = F.relu6(_bn(_conv(h, sd, f"{p}.0"), sd, f"{p}.1", False))
            idx = 3
        h = F.relu6(_bn(_conv(h, sd, f"{p}.{idx}", stride, 0, d, hidden), sd, f"{p}.{idx + 1}", False))
        h = _bn(_conv(h, sd, f"{p}.{idx + 3}"), sd, f"{p}.{idx + 4}", False)
        x = x + h if stride == 1 and inp == oup else h
        if k == 3:
            low = x
    # extract_feature's preReLU maps: features[k].conv[0:2] re-run on the block's unpadded input
    pre = [_bn(_conv(ins[k], sd, f"backbone.features.{k}.conv.0"), sd, f"backbone.features.{k}.conv.1", False)
           for k in (4, 7, 14)]
    return [*pre, x], x, low


def reference(x: Tensor, sd: SD, backbone: str, os: int = 16, train: bool = False):
    """(six extract_feature maps, dense class scores, logits) of the official DeepLab."""
    if backbone == "mobilenet":
        feats, h, low = _ref_mobilenet(x, sd, os)
    else:
        feats, h, low = _ref_resnet(x, sd, int(backbone[6:]), os, train)
    rates = (6, 12, 18) if os == 16 else (12, 24, 36)
    br = [F.relu(_bn(_conv(h, sd, "aspp.aspp1.atrous_conv"), sd, "aspp.aspp1.bn", train))]
    br += [F.relu(_bn(_conv(h, sd, f"aspp.aspp{i + 2}.atrous_conv", 1, r, r), sd, f"aspp.aspp{i + 2}.bn", train))
           for i, r in enumerate(rates)]
    g = F.relu(_bn(_conv(F.adaptive_avg_pool2d(h, 1), sd, "aspp.global_avg_pool.1"), sd, "aspp.global_avg_pool.2",
                   train))
    br.append(F.interpolate(g, size=br[3].shape[2:], mode="bilinear", align_corners=True))
    a = _bn(_conv(torch.cat(br, 1), sd, "aspp.conv1"), sd, "aspp.bn1", train)
    feats.append(a)
    a = F.dropout(F.relu(a), 0.5, train)
    low = F.relu(_bn(_conv(low, sd, "decoder.conv1"), sd, "decoder.bn1", train))
    y = torch.cat((F.interpolate(a, size=low.shape[2:], mode="bilinear", align_corners=True), low), 1)
    y = F.dropout(F.relu(_bn(_conv(y, sd, "decoder.last_conv.0", 1, 1), sd, "decoder.last_conv.1", train)), 0.5, train)
    y = _bn(_conv(y, sd, "decoder.last_conv.4", 1, 1), sd, "decoder.last_conv.5", train)
    feats.append(y)
    dense = _conv(F.dropout(F.relu(y), 0.1, train), sd, "decoder.last_conv.8")
    return feats, dense, F.interpolate(dense, size=x.shape[2:], mode="bilinear", align_corners=True)


def _compare(model: nn.Module, backbone: str, x: Tensor, os: int = 16, train: bool = False) -> None:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train)
    extractor = FeatureExtractor(model, ("feats", "preact", "dense_logits"))
    torch.manual_seed(1)  # the same dropout masks: both draw them in the same order
    with torch.no_grad():
        out = extractor(x)
    extractor.remove()
    torch.manual_seed(1)
    feats, dense, logits = reference(x, sd, backbone, os, train)
    assert len(out.preact) == 7 and len(feats) == 6
    for mine, ref in zip(out.preact[1:], feats, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    for i, (post, pre) in enumerate(zip(out.feats[1:], out.preact[1:], strict=True)):
        if not (backbone == "mobilenet" and i == 3):  # MobileNetV2's last backbone stage is linear
            assert (pre < 0).any()
            torch.testing.assert_close(post, (F.relu6 if backbone == "mobilenet" and i < 3 else F.relu)(pre))
    torch.testing.assert_close(out.dense_logits, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)


def _model(name: str, randomize, num_classes: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize(create_model(name, num_classes=num_classes, **kwargs))


# --------------------------------------------------------------------------------------------------- DeepLabV3+


@pytest.mark.parametrize(("name", "millions"), [("deeplabv3plus_resnet101", 59.3), ("deeplabv3plus_resnet18", 16.6),
                                                ("deeplabv3plus_mobilenetv2", 5.8)])
def test_parameter_counts(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = create_model(name, num_classes=21)
    assert round(count_parameters(model) / 1e6, 1) == millions
    assert model.head_modules == ("aspp", "decoder")


def test_resnet18_matches_official_eval_and_train(randomize) -> None:
    model = _model("deeplabv3plus_resnet18", randomize)
    x = torch.randn(2, 3, 65, 65)
    _compare(model, "resnet18", x)
    _compare(model, "resnet18", x, train=True)  # dropout and batch statistics as the official


def test_resnet101_matches_official(randomize) -> None:
    _compare(_model("deeplabv3plus_resnet101", randomize), "resnet101", torch.randn(2, 3, 65, 65))


@pytest.mark.parametrize("os", [16, 8])
def test_mobilenetv2_matches_official(randomize, os: int) -> None:
    model = _model("deeplabv3plus_mobilenetv2", randomize, output_stride=os)
    # The pre taps of features[4], [7], [14] crop the padding their block applied: 1, 1, 1 at stride 16;
    # 1, 1, 2 at stride 8 (features[14] runs at dilation 2 there).
    assert [t.crop for t in model.tap_spec.stages_pre[:3]] == ([1, 1, 1] if os == 16 else [1, 1, 2])
    _compare(model, "mobilenet", torch.randn(2, 3, 65, 65), os=os)


def test_probe_shapes_and_tap_modules() -> None:
    expected = {"deeplabv3plus_resnet18": [64, 128, 256, 512, 256, 256],
                "deeplabv3plus_mobilenetv2": [144, 192, 576, 320, 256, 256]}
    for name, channels in expected.items():
        model = create_model(name, num_classes=5)
        out = probe_shapes(model, (3, 65, 65))
        assert [f.shape[1] for f in out.preact[1:]] == channels
        assert [tuple(f.shape[2:]) for f in out.preact[1:]] == [(17, 17), (9, 9), (5, 5), (5, 5), (5, 5), (17, 17)]
        assert tuple(out.pooled.shape) == (2, channels[3]) and tuple(out.prepool.shape) == (2, channels[3], 5, 5)
        assert tuple(out.dense_logits.shape) == (2, 5, 17, 17) and tuple(out.logits.shape) == (2, 5, 65, 65)
        torch.testing.assert_close(out.pooled, out.prepool.mean((2, 3)))
        assert [b.num_features for b in bn_before_relu(model)] == channels
    assert create_model("deeplabv3plus_mobilenetv2").tap_spec.signed


def test_output_stride_8_shapes() -> None:
    model = create_model("deeplabv3plus_resnet18", num_classes=2, output_stride=8)
    out = probe_shapes(model, (3, 65, 65), groups=("preact",))
    assert [tuple(f.shape[1:]) for f in out.preact[1:]] == [
        (64, 17, 17), (128, 9, 9), (256, 9, 9), (512, 9, 9), (256, 9, 9), (256, 17, 17)]
    assert model.aspp.aspp4.atrous_conv.dilation == (36, 36)
    with pytest.raises(UserInputError, match="output_stride 8 or 16"):
        create_model("deeplabv3plus_resnet18", output_stride=32)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_checkpoint_layout_loads_strictly(tmp_path, randomize, prefix: str) -> None:
    source = _model("deeplabv3plus_mobilenetv2", randomize, num_classes=21)
    sd = source.state_dict()
    # pytorch-deeplab-xception registers slices of `features`: the same weights under three names
    assert "backbone.low_level_features.0.0.weight" in sd and "backbone.high_level_features.13.conv.7.bias" in sd
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": {prefix + k: v for k, v in sd.items()}, "optimizer": {}, "best_pred": 0.7},
               path)
    target = create_model("deeplabv3plus_mobilenetv2", num_classes=21)
    meta = load_checkpoint(target, path)
    assert meta["epoch"] == 3 and meta["best_pred"] == 0.7 and meta["format"] == "overhaul"
    for key, value in target.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_wrong_backbone_checkpoint_is_named(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save({"epoch": 1, "state_dict": create_model("deeplabv3plus_resnet18", num_classes=21).state_dict()}, path)
    with torch.device("meta"):
        r101 = create_model("deeplabv3plus_resnet101", num_classes=21)
    with pytest.raises(CheckpointError, match=r"does not fit model 'deeplabv3plus_resnet101'") as info:
        load_checkpoint(r101, path)
    assert "missing key(s): backbone.layer1.0.conv3.weight" in str(info.value)
    assert "'deeplabv3plus_resnet18' (num_classes=21)" in str(info.value)


def test_backbone_checkpoint_torchvision_layout(tmp_path) -> None:
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18-5c106cde.pth"
    torch.save(imagenet.state_dict(), path)
    model = create_model("deeplabv3plus_resnet18", backbone_checkpoint=str(path))
    loaded = model.backbone.state_dict()
    for key, value in imagenet.state_dict().items():
        assert key.startswith("fc.") or torch.equal(loaded[key], value), key
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"does not fit the ResNetBackbone.*missing key\(s\): conv1.weight"):
        create_model("deeplabv3plus_resnet18", backbone_checkpoint=str(wrong))
    with pytest.raises(CheckpointError, match=r"shape mismatch\(es\): layer1.0.conv1.weight file \[64, 64, 3, 3\]"):
        create_model("deeplabv3plus_resnet50", backbone_checkpoint=str(path))


def test_backbone_checkpoint_mobilenet_imagenet_layout(tmp_path) -> None:
    source = create_model("deeplabv3plus_mobilenetv2").backbone.features
    # mobilenet_v2-6a65762b.pth: features.0-17 as DeepLab's, the 1280-channel features.18 and classifier.1
    sd = {f"features.{k}": v for k, v in source.state_dict().items()}
    sd |= {"features.18.0.weight": torch.randn(1280, 320, 1, 1), "classifier.1.weight": torch.randn(1000, 1280)}
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(sd, path)
    model = create_model("deeplabv3plus_mobilenetv2", backbone_checkpoint=str(path))
    assert torch.equal(model.backbone.features[17].conv[6].weight, source[17].conv[6].weight)
    assert model.backbone.low_level_features[2] is model.backbone.features[2]
    del sd["features.5.conv.3.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): features.5.conv.3.weight"):
        create_model("deeplabv3plus_mobilenetv2", backbone_checkpoint=str(path))


# --------------------------------------------------------------------------------------------------- torchvision


def test_torchvision_lraspp_trains_a_step_with_taps() -> None:
    torch.manual_seed(0)
    model = create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    plain = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3)
    assert isinstance(model, torchvision.models.segmentation.LRASPP)
    assert list(model.state_dict()) == list(plain.state_dict())  # torchvision's keys, no wrapper prefix
    x, target = torch.randn(2, 3, 65, 65), torch.randint(0, 3, (2, 65, 65))
    extractor = FeatureExtractor(model.train(), ALL_GROUPS)
    out = extractor(x)
    assert tuple(out.logits.shape) == (2, 3, 65, 65) and tuple(out.dense_logits.shape) == (2, 3, 9, 9)
    torch.testing.assert_close(out.logits, F.interpolate(out.dense_logits, size=(65, 65), mode="bilinear"))
    assert [f.shape[1] for f in out.feats] == [16, 16, 24, 40, 112, 960] and tuple(out.pooled.shape) == (2, 960)
    before, optimizer = model.classifier.high_classifier.weight.detach().clone(), torch.optim.SGD(model.parameters(), 1)
    loss = F.cross_entropy(out.logits, target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.classifier.high_classifier.weight)
    extractor.remove()


@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_torchvision_resnet_segmentation_taps(arch: str) -> None:
    model = create_model(f"torchvision:{arch}", num_classes=21)
    assert model.tap_spec.classifier == "classifier.4"
    with torch.no_grad():
        out = features(model.eval(), torch.randn(2, 3, 65, 65))
    assert [tuple(f.shape[1:]) for f in out.feats] == [
        (64, 33, 33), (256, 17, 17), (512, 9, 9), (1024, 9, 9), (2048, 9, 9)]
    for post, pre in zip(out.feats[1:], out.preact[1:], strict=True):
        assert (pre < 0).any() and torch.equal(post, F.relu(pre))
    assert tuple(out.dense_logits.shape) == (2, 21, 9, 9)
    torch.testing.assert_close(out.logits, F.interpolate(out.dense_logits, size=(65, 65), mode="bilinear"))
    if arch.startswith("deeplab"):
        assert tuple(out.pooled.shape) == (2, 2048)
        torch.testing.assert_close(out.pooled, out.prepool.mean((2, 3)))

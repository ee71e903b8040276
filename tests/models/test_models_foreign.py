"""timm / torchvision models and kdzoo's ImageNet models: creation, default taps, custom taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import UserInputError
from kdzoo.models import FeatureExtractor, count_parameters, create_model, features
from kdzoo.models.foreign import parse_tap, tap_spec_from_config
from kdzoo.models.taps import ALL_GROUPS, Tap, bn_before_relu, classifier_of, get_tap_spec

# docs/models.md, 1000 classes
IMAGENET_PARAMS = {
    "tv_resnet18": 11_689_512,
    "tv_resnet34": 21_797_672,
    "tv_resnet50": 25_557_032,
    "tv_resnet101": 44_549_160,
    "tv_resnet152": 60_192_808,
    "MobileNetV1": 4_231_976,
}


def _bn_counts(model: nn.Module) -> set[int]:
    return {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _train_step_counts(model: nn.Module, x: torch.Tensor) -> set[int]:
    model.train()
    extractor = FeatureExtractor(model, ALL_GROUPS)
    with torch.no_grad():
        extractor(x)
    extractor.remove()
    return _bn_counts(model)


# --------------------------------------------------------------------------------------------------- timm


def test_timm_resnet18_outputs(randomize) -> None:
    model = randomize(create_model("timm:resnet18", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = features(model, x)
        reference = model.forward_intermediates(x, intermediates_only=True)  # timm's own feature API
        logits = model(x)
    expected = [(2, 64, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    assert [tuple(f.shape) for f in out.feats] == expected
    assert [tuple(f.shape) for f in out.preact] == expected
    assert tuple(out.pooled.shape) == (2, 512) and tuple(out.logits.shape) == (2, 10)
    for mine, theirs in zip(out.feats, reference, strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(model.get_classifier()(out.pooled), logits)
    # Pre taps read the input of the in-place act2: captured before it is overwritten.
    for post, pre in zip(out.feats[1:], out.preact[1:], strict=True):
        assert (pre < 0).any() and torch.equal(post, F.relu(pre))
    assert [type(m).__name__ for m in bn_before_relu(model)] == ["BatchNorm2d"] * 4


def test_timm_taps_do_not_rerun_modules() -> None:
    model = create_model("timm:resnet18", num_classes=10)
    assert _train_step_counts(model, torch.randn(2, 3, 32, 32)) == {1}


def test_timm_model_without_pre_taps() -> None:
    model = create_model("timm:mobilenetv3_small_050", num_classes=10).eval()
    spec = get_tap_spec(model)
    assert spec.stages_pre is None and spec.classifier == "classifier"
    with torch.no_grad():
        out = features(model, torch.randn(1, 3, 64, 64))
    assert len(out.feats) == 5 and out.preact == out.feats
    assert out.pooled is not None and out.pooled.dim() == 2
    assert _train_step_counts(model, torch.randn(2, 3, 64, 64)) == {1}


def test_unknown_foreign_names() -> None:
    with pytest.raises(UserInputError, match="timm has no model"):
        create_model("timm:resnet18_does_not_exist", num_classes=10)
    with pytest.raises(UserInputError, match="resnet18"):
        create_model("torchvision:resnet81", num_classes=10)


# --------------------------------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", ["torchvision:resnet18", "tv_resnet18"])
def test_torchvision_resnet18_outputs(name: str, randomize) -> None:
    model = randomize(create_model(name, num_classes=10)).eval()
    with torch.no_grad():
        out = features(model, torch.randn(2, 3, 32, 32))
    expected = [(2, 64, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    assert [tuple(f.shape) for f in out.feats] == expected
    assert [tuple(f.shape) for f in out.preact] == expected
    assert tuple(out.pooled.shape) == (2, 512)
    # The shared `relu` runs twice per BasicBlock: its 2nd call's input is the residual sum, cloned
    # before the in-place ReLU overwrites it.
    for post, pre in zip(out.feats[1:], out.preact[1:], strict=True):
        assert (pre < 0).any() and torch.equal(post, F.relu(pre))
    assert _train_step_counts(model, torch.randn(2, 3, 32, 32)) == {1}


def test_torchvision_bottleneck_pre_tap_uses_third_relu_call(randomize) -> None:
    model = randomize(create_model("tv_resnet50", num_classes=10)).eval()
    spec = get_tap_spec(model)
    assert [t.call for t in spec.stages_pre] == [2, 2, 2, 2]
    assert spec.bn_before_relu == ("layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3")
    with torch.no_grad():
        out = features(model, torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in out.preact] == [64, 256, 512, 1024, 2048]
    for post, pre in zip(out.feats[1:], out.preact[1:], strict=True):
        assert (pre < 0).any() and torch.equal(post, F.relu(pre))


def test_torchvision_mobilenet_v2_taps() -> None:
    with torch.device("meta"):
        model = create_model("tv_mobilenet_v2", num_classes=10)
        out = features(model, torch.empty(2, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in out.feats] == [
        (32, 112, 112),
        (24, 56, 56),
        (32, 28, 28),
        (96, 14, 14),
        (320, 7, 7),
    ]
    assert out.preact == out.feats and get_tap_spec(model).signed
    assert tuple(out.pooled.shape) == (2, 1280)
    assert isinstance(classifier_of(model), nn.Linear)


def test_imagenet_parameter_counts() -> None:
    for name, expected in IMAGENET_PARAMS.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=1000)
        assert count_parameters(model) == expected, name


def test_torchvision_state_dict_loads_into_tv_names() -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    model = create_model("tv_resnet18", num_classes=10)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert list(model.state_dict()) == list(reference.state_dict())


# --------------------------------------------------------------------------------------------------- MobileNetV1


def test_mobilenetv1_taps(randomize) -> None:
    model = randomize(create_model("MobileNetV1", num_classes=1000)).eval()
    with torch.no_grad():
        out = features(model, torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in out.feats] == [
        (32, 112, 112),
        (128, 56, 56),
        (256, 28, 28),
        (512, 14, 14),
        (1024, 7, 7),
    ]
    assert tuple(out.pooled.shape) == (1, 1024)
    # mdistiller: pre = BN outputs of blocks 3/5/11/13, post = relu(pre).
    for post, pre in zip(out.feats[1:], out.preact[1:], strict=True):
        assert (pre < 0).any() and torch.equal(post, F.relu(pre))
    assert get_tap_spec(model).bn_before_relu == ("model.3.4", "model.5.4", "model.11.4", "model.13.4")
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 256, 256))


# --------------------------------------------------------------------------------------------------- custom taps


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.body(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_generic_model_needs_named_taps() -> None:
    model = _Tiny()
    with pytest.raises(UserInputError, match="name the taps in the config, e.g. teacher.taps"):
        get_tap_spec(model)
    with pytest.raises(UserInputError, match="name the taps"):
        FeatureExtractor(model, ("feats",))
    FeatureExtractor(model, ())  # no taps requested: nothing to derive, no error


def test_tap_spec_from_config(randomize) -> None:
    model = randomize(_Tiny()).eval()
    spec = tap_spec_from_config(
        {
            "stem": "stem",
            "stages": ["act"],
            "stages_pre": ["in:act"],
            "classifier": "head",
            "bn_before_relu": ["body.1"],
        },
        model,
    )
    assert spec.pooled == Tap("head", point="input")
    assert spec.stages_pre == (Tap("act", point="input", transform="clone"),)  # in-place module: cloned
    model.tap_spec = spec
    with torch.no_grad():
        out = features(model, torch.randn(2, 3, 8, 8))
    assert (out.preact[1] < 0).any() and torch.equal(out.feats[1], F.relu(out.preact[1]))
    assert tuple(out.pooled.shape) == (2, 16)
    with pytest.raises(UserInputError, match="no module 'bdy'"):
        tap_spec_from_config({"stem": "stem", "stages": ["bdy"], "classifier": "head"}, model)
    with pytest.raises(UserInputError, match="taps.stages is required"):
        tap_spec_from_config({"stem": "stem", "classifier": "head"})


def test_parse_tap_syntax() -> None:
    assert parse_tap("layer1") == Tap("layer1")
    assert parse_tap("in:layer4.1.relu#1") == Tap("layer4.1.relu", point="input", call=1)
    assert parse_tap({"module": "fc", "point": "input", "transform": "flatten"}) == Tap(
        "fc", point="input", transform="flatten"
    )
    with pytest.raises(UserInputError):
        parse_tap("in:x#one")
    with pytest.raises(UserInputError):
        parse_tap({"point": "input"})


def test_create_foreign_model_with_custom_taps() -> None:
    taps = {"stem": "relu", "stages": ["layer1", "layer2", "layer3", "layer4"], "classifier": "fc"}
    model = create_model("torchvision:resnet18", num_classes=10, taps=taps).eval()
    assert model.tap_spec.stages_pre is None
    with torch.no_grad():
        out = features(model, torch.randn(1, 3, 32, 32))
    assert len(out.feats) == 5 and out.preact == out.feats

"""torchvision and timm models in the zoo: ``timm:<name>`` / ``torchvision:<name>`` and their feature taps.

The tap positions follow docs/models.md ("Foreign models"):

* torchvision ResNets: stem = out(``relu``) (the stem's own module; blocks have their own), stages =
  out(``layerK``), pre = in(``layerK[-1].relu``) on its last call in the block (2nd call in a
  ``BasicBlock``, 3rd in a ``Bottleneck``: the module is shared), pooled = in(``fc``).
* torchvision MobileNetV2: the linear-bottleneck outputs that close each resolution (as RepDistiller's
  CIFAR MobileNetV2 selects them), signed, no pre taps, pooled = in(``classifier``).
* timm: post taps from ``model.feature_info`` (first entry = stem), pre taps for timm's ResNet family
  (= in(last block's ``act2``/``act3``)), pooled = input of ``get_classifier()``.

Anything else needs its taps named in the config (``teacher.taps`` / ``student.taps``, read by
:func:`tap_spec_from_config`). Both libraries use
in-place activations: a tap that reads the input of an in-place module is captured with
``transform="clone"`` (the module would overwrite it right after the pre-hook ran); the model itself
is left untouched.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from kdzoo.errors import UserInputError
from kdzoo.models.taps import TAP_CONFIG_HINT, Tap, TapSpec, register_tap_resolver

FOREIGN_PREFIXES = ("timm:", "torchvision:")

# Post-build adapters (``model -> model``, or ``None`` when the adapter does not know the model): how a zoo
# package makes a foreign model fit kdzoo's contract, ``forward(x) -> logits`` (kdzoo/models/segmentation/
# torchvision_seg.py: torchvision's segmentation models return a dict). Registered by the package on import, so
# this module knows no model family.
ForeignAdapter = Callable[[nn.Module], "nn.Module | None"]
_ADAPTERS: list[ForeignAdapter] = []


def register_foreign_adapter(adapter: ForeignAdapter) -> ForeignAdapter:
    _ADAPTERS.append(adapter)
    return adapter


# --------------------------------------------------------------------------------------------------- creation


def create_foreign_model(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build ``timm:<name>`` or ``torchvision:<name>`` with random weights (``pretrained``/``weights`` off);
    keywords go to ``timm.create_model`` / ``torchvision.models.get_model``."""
    prefix, _, arch = name.partition(":")
    if not arch:
        raise UserInputError(f"model name {name!r} lacks the architecture after {prefix + ':'!r}")
    if prefix == "timm":
        model = _create_timm(arch, num_classes, kwargs)
    elif prefix == "torchvision":
        model = _create_torchvision(arch, num_classes, kwargs)
    else:
        raise UserInputError(f"unknown model prefix in {name!r}; expected one of {FOREIGN_PREFIXES}")
    for adapter in _ADAPTERS:
        adapted = adapter(model)
        if adapted is not None:
            model = adapted
            break
    model.kdzoo_name = name  # type: ignore[assignment]
    return model


def _create_timm(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(arch, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr('timm:' + c) for c in close)}?" if close else ""
        raise UserInputError(f"timm has no model {arch!r}.{hint}") from exc


def _create_torchvision(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr('torchvision:' + c) for c in close)}?" if close else ""
        raise UserInputError(f"torchvision has no model {arch!r}.{hint}")
    kwargs.setdefault("weights", None)
    with_backbone = (torchvision.models.segmentation, torchvision.models.detection)
    if any(arch in torchvision.models.list_models(module=m) for m in with_backbone):
        kwargs.setdefault("weights_backbone", None)  # their builders default to ImageNet weights (a download)
    return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------- default taps


@register_tap_resolver
def derive_tap_spec(model: nn.Module) -> TapSpec | None:
    """Taps of a torchvision / timm model; ``None`` for a model of neither library (its taps must be named)."""
    spec = _torchvision_spec(model) or _timm_spec(model)
    return None if spec is None else safe_inplace(spec, model)


def _torchvision_spec(model: nn.Module) -> TapSpec | None:
    try:
        from torchvision.models import MobileNetV2, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if isinstance(model, ResNet):
        layers = [f"layer{i}" for i in (1, 2, 3, 4)]
        pre_taps = torchvision_resnet_pre_taps(model, layers, "")
        if pre_taps is None:
            return None
        pre, bns = pre_taps
        return TapSpec(
            stem=Tap("relu"),
            stages=tuple(Tap(layer) for layer in layers),
            stages_pre=tuple(pre),
            pooled=Tap("fc", point="input"),
            classifier="fc",
            bn_before_relu=tuple(bns),
        )
    if isinstance(model, MobileNetV2):
        features = model.features
        # Last block of each resolution (24, 32, 96, 320 channels at width 1), like RepDistiller's CIFAR
        # MobileNetV2 (blocks 1, 2, 4, 6 of its t/c/n/s table).
        ends = _mobilenetv2_stage_ends(features)
        if ends is None:
            return None
        return TapSpec(
            stem=Tap("features.0"),
            stages=tuple(Tap(f"features.{i}") for i in ends),
            stages_pre=None,
            pooled=Tap("classifier", point="input"),
            classifier=f"classifier.{len(model.classifier) - 1}",
            signed=True,
            prepool=Tap("features"),  # ends with the 1280-channel 1x1 conv; pooling is functional
        )
    return None


def torchvision_resnet_pre_taps(body: nn.Module, layers: list[str], prefix: str) -> tuple[list[Tap], list[str]] | None:
    """The pre-ReLU tap of each stage of a torchvision ResNet body (the input of the last block's shared ``relu``
    at its final call, after the add) and the BatchNorm feeding it; ``prefix`` is the body's module path in the
    whole model. ``None`` when a stage does not end in a torchvision BasicBlock / Bottleneck."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    pre: list[Tap] = []
    bns: list[str] = []
    for layer in layers:
        stage = body.get_submodule(layer)
        last = f"{prefix}{layer}.{len(stage) - 1}"  # type: ignore[arg-type]
        block = stage[-1]  # type: ignore[index]
        # The block's `relu` is shared: called after bn1 (and bn2 in a Bottleneck), then after the add.
        if isinstance(block, Bottleneck):
            pre.append(Tap(f"{last}.relu", point="input", call=2))
            bns.append(f"{last}.bn3")
        elif isinstance(block, BasicBlock):
            pre.append(Tap(f"{last}.relu", point="input", call=1))
            bns.append(f"{last}.bn2")
        else:
            return None
    return pre, bns


def _mobilenetv2_stage_ends(features: nn.Sequential) -> list[int] | None:
    """Indices of the torchvision MobileNetV2 blocks that end the 24/32/96/320-channel groups."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    widths: list[int] = []
    for block in features:
        if isinstance(block, InvertedResidual):
            widths.append(block.out_channels)
        else:
            widths.append(-1)
    groups: list[int] = []  # index of the last block of each run of equal output widths
    for i, w in enumerate(widths):
        if w < 0:
            continue
        if i + 1 >= len(widths) or widths[i + 1] != w:
            groups.append(i)
    # groups = ends of the 16, 24, 32, 64, 96, 160, 320 runs
    if len(groups) != 7:
        return None
    return [groups[i] for i in (1, 2, 4, 6)]


def _timm_spec(model: nn.Module) -> TapSpec | None:
    info = getattr(model, "feature_info", None)
    get_classifier = getattr(model, "get_classifier", None)
    if info is None or get_classifier is None:
        return None
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    modules = dict(model.named_modules())
    paths = [_resolve_module_path(str(e["module"]), modules) for e in entries]
    if len(paths) < 2 or any(p is None for p in paths):
        return None
    classifier = get_classifier()
    classifier_path = next((n for n, m in model.named_modules() if m is classifier), None)
    if classifier_path is None:
        return None
    stage_paths = [p for p in paths[1:] if p is not None]
    pre, bns = _timm_resnet_pre(model, stage_paths)
    # timm's heads pool with a module named ``global_pool``: its input is the map being pooled.
    pool_path = next((n for n in modules if n.rsplit(".", 1)[-1] == "global_pool"), None)
    return TapSpec(
        stem=Tap(paths[0]),  # type: ignore[arg-type]
        stages=tuple(Tap(p) for p in stage_paths),
        stages_pre=pre,
        pooled=Tap(classifier_path, point="input"),
        classifier=classifier_path,
        bn_before_relu=bns,
        prepool=None if pool_path is None else Tap(pool_path, point="input"),
    )


def _resolve_module_path(name: str, modules: Mapping[str, nn.Module]) -> str | None:
    if name in modules:
        return name
    dotted = name.replace("_", ".")  # some timm feature_info names are FX-style (``stages_0``)
    return dotted if dotted in modules else None


def _timm_resnet_pre(
    model: nn.Module, stage_paths: Sequence[str]
) -> tuple[tuple[Tap, ...] | None, tuple[str, ...] | None]:
    """Pre-activation taps for timm's ResNet family: the input of the last block's final activation."""
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - timm is optional at runtime
        return None, None
    pre: list[Tap] = []
    bns: list[str] = []
    has_se = False
    for path in stage_paths:
        stage = model.get_submodule(path)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            return None, None
        last = f"{path}.{len(stage) - 1}"
        block = stage[-1]
        if isinstance(block, Bottleneck):
            pre.append(Tap(f"{last}.act3", point="input"))
            bns.append(f"{last}.bn3")
        elif isinstance(block, BasicBlock):
            pre.append(Tap(f"{last}.act2", point="input"))
            bns.append(f"{last}.bn2")
        else:
            return None, None
        # A squeeze-excitation sits between the BN and the add: then no BN produces the tap.
        has_se = has_se or getattr(block, "se", None) is not None
    return tuple(pre), (None if has_se else tuple(bns))


# --------------------------------------------------------------------------------------------------- custom taps


def safe_inplace(spec: TapSpec, model: nn.Module) -> TapSpec:
    """Clone every tap that reads the input of an in-place module (it is overwritten right after)."""
    modules = dict(model.named_modules())

    def fix(tap: Tap) -> Tap:
        module = modules.get(tap.module)
        if tap.point == "input" and tap.transform is None and getattr(module, "inplace", False):
            return replace(tap, transform="clone")
        return tap

    return replace(
        spec,
        stem=fix(spec.stem),
        stages=tuple(fix(t) for t in spec.stages),
        stages_pre=None if spec.stages_pre is None else tuple(fix(t) for t in spec.stages_pre),
        pooled=fix(spec.pooled),
        prepool=None if spec.prepool is None else fix(spec.prepool),
    )


def parse_tap(value: str | Mapping[str, Any], where: str = "tap") -> Tap:
    """``"layer1"`` (output), ``"in:layer4.1.relu#1"`` (input, 2nd call) or a dict of :class:`Tap` fields."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"module", "point", "call", "index", "transform", "crop"}
        if unknown or "module" not in value:
            raise UserInputError(
                f"{where}: a tap mapping needs 'module' and may have point/call/index/transform/crop; got "
                f"{sorted(value)}"
            )
        if value.get("point", "output") not in ("output", "input"):
            raise UserInputError(f"{where}.point must be 'output' or 'input', got {value['point']!r}")
        if value.get("transform") not in (None, "flatten", "relu", "clone"):
            raise UserInputError(f"{where}.transform must be flatten, relu or clone, got {value['transform']!r}")
        return Tap(**dict(value))
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{where}: expected a module path string or a mapping, got {value!r}")
    text = value.strip()
    point = "output"
    for prefix, p in (("in:", "input"), ("out:", "output")):
        if text.startswith(prefix):
            text, point = text[len(prefix) :], p
    call = 0
    if "#" in text:
        text, _, call_text = text.partition("#")
        if not call_text.isdigit():
            raise UserInputError(f"{where}: call index after '#' must be an integer, got {value!r}")
        call = int(call_text)
    return Tap(text, point=point, call=call)  # type: ignore[arg-type]


def tap_spec_from_config(config: Mapping[str, Any], model: nn.Module | None = None, where: str = "taps") -> TapSpec:
    """Build a :class:`TapSpec` from module paths: ``stem``, ``stages``, ``stages_pre``, ``pooled``, ``prepool``,
    ``classifier``, ``bn_before_relu``, ``signed`` (the ``teacher.taps`` / ``student.taps`` config values).

    ``pooled`` defaults to the classifier's input. With ``model`` every path is checked against
    ``model.named_modules()`` (a wrong one is named, with the closest existing paths) and in-place inputs
    are captured safely. ``where`` prefixes the config path in error messages.
    """
    allowed = {"stem", "stages", "stages_pre", "pooled", "prepool", "classifier", "bn_before_relu", "signed"}
    unknown = set(config) - allowed
    if unknown:
        raise UserInputError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("stem", "stages", "classifier"):
        if key not in config:
            raise UserInputError(f"{where}.{key} is required ({TAP_CONFIG_HINT})")
    stages_cfg = config["stages"]
    if isinstance(stages_cfg, (str, Mapping)) or not stages_cfg:
        raise UserInputError(f"{where}.stages must be a non-empty list of taps")
    stages = tuple(parse_tap(t, f"{where}.stages[{i}]") for i, t in enumerate(stages_cfg))
    stages_pre = None
    if config.get("stages_pre") is not None:
        pre_cfg = config["stages_pre"]
        if isinstance(pre_cfg, (str, Mapping)) or len(pre_cfg) != len(stages):
            raise UserInputError(f"{where}.stages_pre must list one tap per stage ({len(stages)})")
        stages_pre = tuple(parse_tap(t, f"{where}.stages_pre[{i}]") for i, t in enumerate(pre_cfg))
    classifier = config["classifier"]
    if not isinstance(classifier, str):
        raise UserInputError(f"{where}.classifier must be a module path, got {classifier!r}")
    pooled = parse_tap(config["pooled"], f"{where}.pooled") if config.get("pooled") else Tap(classifier, point="input")
    prepool = parse_tap(config["prepool"], f"{where}.prepool") if config.get("prepool") else None
    bns = config.get("bn_before_relu")
    spec = TapSpec(
        stem=parse_tap(config["stem"], f"{where}.stem"),
        stages=stages,
        stages_pre=stages_pre,
        pooled=pooled,
        classifier=classifier,
        bn_before_relu=None if bns is None else tuple(str(b) for b in bns),
        signed=bool(config.get("signed", False)),
        prepool=prepool,
    )
    if model is None:
        return spec
    modules = dict(model.named_modules())
    named = [("stem", spec.stem.module), ("pooled", spec.pooled.module), ("classifier", spec.classifier)]
    named += [(f"stages[{i}]", t.module) for i, t in enumerate(spec.stages)]
    named += [(f"stages_pre[{i}]", t.module) for i, t in enumerate(spec.stages_pre or ())]
    named += [(f"bn_before_relu[{i}]", b) for i, b in enumerate(spec.bn_before_relu or ())]
    named += [("prepool", spec.prepool.module)] if spec.prepool is not None else []
    for key, path in named:
        if path not in modules:
            close = difflib.get_close_matches(path, list(modules), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UserInputError(f"{where}.{key}: {type(model).__name__} has no module {path!r}.{hint}")
    return safe_inplace(spec, model)

"""One feature-tap mechanism for every model: ours, torchvision's and timm's.

A model family declares a :class:`TapSpec` (which module boundaries hold the stem, the stage
outputs, their pre-activation versions, the pooled embedding). :class:`FeatureExtractor` turns
the spec into forward hooks, registered once and only for the tap groups a caller asks for, so a
model whose features nobody needs pays nothing. Model code stays a plain ``forward(x) -> logits``.

Why hooks and not an ``is_feat`` flag: the same mechanism then works for foreign models, and a tap
can never re-run a module (docs/design.md: re-invoking a BatchNorm in train mode moves its running
statistics a second time, the mdistiller WRN bug).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdzoo.errors import UserInputError

TapGroup = Literal["feats", "preact", "pooled", "prepool", "dense_logits"]
ALL_GROUPS: tuple[TapGroup, ...] = ("feats", "preact", "pooled", "prepool", "dense_logits")


@dataclass(frozen=True)
class Tap:
    """Where one tensor is read.

    ``point="input"`` reads the first positional input through a *pre*-hook, i.e. before the
    module can modify it in place; ``call`` selects which call of a module that runs several
    times per forward (torchvision's shared ``BasicBlock.relu``); ``index`` picks a tuple element;
    ``transform`` covers values no module materialises; ``crop`` removes that many border pixels on every side
    of the map (a module that runs on an explicitly padded input, e.g. the 1x1 expansion of a MobileNetV2 block
    in pytorch-deeplab-xception, whose unpadded output is what the official OFD reads).
    """

    module: str
    point: Literal["output", "input"] = "output"
    call: int = 0
    index: int | None = None
    transform: Literal["flatten", "relu", "clone"] | None = None
    crop: int = 0


@dataclass(frozen=True)
class TapSpec:
    """Ordered taps of one model family (docs/models.md)."""

    stem: Tap
    stages: tuple[Tap, ...]
    pooled: Tap
    classifier: str
    # ``None`` when the family has no pre-activation taps: ``preact`` then repeats ``feats``
    # (RepDistiller's behaviour for MobileNetV2).
    stages_pre: tuple[Tap, ...] | None = None
    # BatchNorm module that produces each pre-activation stage tap (OFD's margins).
    bn_before_relu: tuple[str, ...] | None = None
    # Stage taps that can be negative (WRN raw residual sums, MobileNetV2 linear bottlenecks).
    signed: bool = False
    # The map that global average pooling turns into ``pooled`` (CAT-KD's class activation maps), where it
    # is not the last stage tap: WRN's final BN+ReLU, MobileNetV2's and ShuffleNetV2's last 1x1 conv.
    prepool: Tap | None = None

    def taps_for(self, groups: Iterable[TapGroup]) -> dict[str, Tap]:
        wanted = set(groups)
        taps: dict[str, Tap] = {}
        if wanted & {"feats", "preact"}:
            taps["stem"] = self.stem
        if "feats" in wanted or ("preact" in wanted and self.stages_pre is None):
            taps.update({f"stage{i + 1}": t for i, t in enumerate(self.stages)})
        if "preact" in wanted and self.stages_pre is not None:
            taps.update({f"stage{i + 1}_pre": t for i, t in enumerate(self.stages_pre)})
        if "pooled" in wanted:
            taps["pooled"] = self.pooled
        if "prepool" in wanted:
            taps["prepool"] = self.prepool if self.prepool is not None else self.stages[-1]
        if "dense_logits" in wanted:
            taps["dense_logits"] = Tap(self.classifier)
        return taps


@dataclass
class Outputs:
    """Everything a method may read from one forward.

    ``feats`` = [stem, stage1, ..., stageL] post-activation (RepDistiller's ``is_feat`` list
    without its trailing pooled vector); ``preact`` = [stem, stage1_pre, ...]; ``pooled`` = the
    classifier's flattened input; ``prepool`` = the map global pooling reduces to ``pooled``;
    ``dense_logits`` = the classifier module's own output: for a segmentation network the class-score map
    before it is upsampled to the input size (what pixel KD and CWD distil), for a classifier the logits.
    Unrequested groups are empty lists / ``None``.
    """

    logits: Tensor
    feats: list[Tensor] = field(default_factory=list)
    preact: list[Tensor] = field(default_factory=list)
    pooled: Tensor | None = None
    prepool: Tensor | None = None
    dense_logits: Tensor | None = None
    # Detection: the detector's own losses (torchvision's loss dict) and the opened-up forward
    # (kdzoo.models.detection.DetectorOutputs: FPN levels, sampled proposals, ROI logits).
    task_losses: dict[str, Tensor] | None = None
    detector: Any = None

    def repdistiller_list(self) -> list[Tensor]:
        """RepDistiller's ``forward(x, is_feat=True)`` list ``[f0, ..., fL, pooled]``."""
        assert self.pooled is not None, "pooled tap was not requested"
        return [*self.feats, self.pooled]

    def detach(self) -> Outputs:
        return Outputs(
            logits=self.logits.detach(),
            feats=[f.detach() for f in self.feats],
            preact=[f.detach() for f in self.preact],
            pooled=None if self.pooled is None else self.pooled.detach(),
            prepool=None if self.prepool is None else self.prepool.detach(),
            dense_logits=None if self.dense_logits is None else self.dense_logits.detach(),
        )


TAP_CONFIG_HINT = (
    "name the taps in the config, e.g. teacher.taps (or student.taps): {stem: act1, stages: [layer1, layer2, "
    "layer3, layer4], stages_pre: ['in:layer4.1.act2'], pooled: 'in:fc', classifier: fc} (module paths as in "
    "model.named_modules(); 'in:' reads a module's input, a '#k' suffix its k-th call; docs/models.md, Taps)"
)

TapSpecResolver = Callable[[nn.Module], "TapSpec | None"]
_RESOLVERS: list[TapSpecResolver] = []


def register_tap_resolver(resolver: TapSpecResolver) -> TapSpecResolver:
    """Teach :func:`get_tap_spec` how to find the taps of models that do not declare a ``tap_spec``: the
    resolver returns a spec for the models it knows (the timm / torchvision adapter registers one) and
    ``None`` for the others."""
    _RESOLVERS.append(resolver)
    return resolver


def get_tap_spec(model: nn.Module) -> TapSpec:
    """The model's own ``tap_spec`` (declared by its family or named in the config), else the first spec a
    registered resolver derives, else a :class:`UserInputError` saying how to name the taps."""
    spec = getattr(model, "tap_spec", None)
    if isinstance(spec, TapSpec):
        return spec
    for resolver in _RESOLVERS:
        spec = resolver(model)
        if spec is not None:
            return spec
    raise UserInputError(
        f"kdzoo cannot derive feature taps (stem, stages, pooled) for {type(model).__module__}."
        f"{type(model).__name__}: {TAP_CONFIG_HINT}"
    )


def _apply(tap: Tap, value: object) -> Tensor:
    if tap.index is not None:
        value = value[tap.index]  # type: ignore[index]
    assert isinstance(value, Tensor)
    if tap.transform == "flatten":
        value = torch.flatten(value, 1)
    elif tap.transform == "relu":
        value = torch.relu(value)
    elif tap.transform == "clone":
        value = value.clone()
    if tap.crop:
        value = value[..., tap.crop : -tap.crop, tap.crop : -tap.crop]
    return value


class FeatureExtractor:
    """Hooks one model once; each call returns :class:`Outputs` for the requested groups.

    Not an ``nn.Module`` on purpose: it owns no parameters, and keeping it out of the module tree
    keeps state_dicts, DDP wrapping and ``torch.compile`` of the model itself untouched. Hooks are
    registered at construction (never inside the step loop, so compiled guards stay stable).
    """

    def __init__(self, model: nn.Module, groups: Sequence[TapGroup] = ()):
        unknown = set(groups) - set(ALL_GROUPS)
        if unknown:
            raise ValueError(f"unknown tap groups {sorted(unknown)}; valid: {ALL_GROUPS}")
        self.model = model
        self.groups = tuple(g for g in ALL_GROUPS if g in groups)
        self.spec = get_tap_spec(model) if self.groups else None
        self._store: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if self.spec is not None:
            modules = dict(model.named_modules())
            for name, tap in self.spec.taps_for(self.groups).items():
                if tap.module not in modules:
                    raise KeyError(
                        f"tap {name!r} names module {tap.module!r}, which "
                        f"{type(model).__name__} does not have"
                    )
                self._hook(modules[tap.module], name, tap)

    def _hook(self, module: nn.Module, name: str, tap: Tap) -> None:
        counter_key = f"{tap.module}#{name}"

        def record(value: object) -> None:
            call = self._calls.get(counter_key, 0)
            self._calls[counter_key] = call + 1
            if call == tap.call:
                self._store[name] = _apply(tap, value)

        if tap.point == "input":
            handle = module.register_forward_pre_hook(lambda _m, args: record(args[0]))
        else:
            handle = module.register_forward_hook(lambda _m, _args, out: record(out))
        self._handles.append(handle)

    def __call__(self, images: Tensor) -> Outputs:
        # Cleared, never re-bound: under torch.compile the hooks keep writing into the same objects.
        self._store.clear()
        self._calls.clear()
        logits = self.model(images)
        out = Outputs(logits=logits)
        if self.spec is None:
            return out
        store = self._store
        n_stages = len(self.spec.stages)
        if "feats" in self.groups:
            out.feats = [store["stem"], *(store[f"stage{i + 1}"] for i in range(n_stages))]
        if "preact" in self.groups:
            suffix = "" if self.spec.stages_pre is None else "_pre"
            out.preact = [
                store["stem"],
                *(store[f"stage{i + 1}{suffix}"] for i in range(n_stages)),
            ]
        if "pooled" in self.groups:
            out.pooled = store["pooled"]
        if "prepool" in self.groups:
            out.prepool = store["prepool"]
        if "dense_logits" in self.groups:
            out.dense_logits = store["dense_logits"]
        self._store.clear()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def features(model: nn.Module, images: Tensor, groups: Sequence[TapGroup] = ALL_GROUPS) -> Outputs:
    """Logits plus every tap of ``model`` on ``images`` (the notebook entry point)."""
    extractor = FeatureExtractor(model, groups)
    try:
        return extractor(images)
    finally:
        extractor.remove()


def classifier_of(model: nn.Module) -> nn.Module:
    """The module that maps the pooled embedding to logits (SimKD / SRRL reuse it)."""
    return model.get_submodule(get_tap_spec(model).classifier)


def bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorms producing each pre-activation stage tap (OFD's margins)."""
    spec = get_tap_spec(model)
    if spec.bn_before_relu is None:
        raise NotImplementedError(
            f"{type(model).__name__} declares no BatchNorm before its stage activations"
        )
    return [model.get_submodule(path) for path in spec.bn_before_relu]  # type: ignore[misc]


@torch.no_grad()
def probe_shapes(
    model: nn.Module, input_shape: Sequence[int], groups: Sequence[TapGroup] = ALL_GROUPS
) -> Outputs:
    """One dry run on a zero batch of 2 in eval mode; restores the training flag afterwards.

    Eval mode so that probing never moves BatchNorm running statistics (mdistiller's FitNet/VID
    probe does, docs/design.md).
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        return features(model, torch.zeros(2, *input_shape, device=device, dtype=dtype), groups)
    finally:
        model.train(was_training)


def compile_model(model: nn.Module, **kwargs: object) -> nn.Module:
    """``torch.compile`` for a model whose features are tapped.

    Dynamo does not guard on module hooks by default, so a graph compiled for one instance of an
    architecture without taps is silently reused for another instance *with* taps, and the hooks never
    fire (seen with this torch: a hookless teacher compiled first, then a tapped one). Guarding on
    hooks gives each hook set its own graph.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(model, **kwargs)  # type: ignore[return-value]

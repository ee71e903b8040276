"""Model registry: ``name -> constructor``; ``timm:<name>`` / ``torchvision:<name>`` resolve there.

The zoo modules register themselves when imported; the package face (``kdzoo/models/__init__.py``) imports
them all, and Python runs it before any of its submodules is used, so the registry is always complete."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kdzoo.errors import UserInputError
from kdzoo.models.foreign import FOREIGN_PREFIXES, create_foreign_model, tap_spec_from_config


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    family: str
    input_size: int  # the input resolution the architecture's fixed pooling expects
    aliases: tuple[str, ...] = field(default=())
    description: str = ""


MODELS: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str, *, family: str, input_size: int = 32, aliases: tuple[str, ...] = (), description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("resnet8", family="cifar")`` on ``fn(num_classes=...)``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for key in (name, *aliases):
            if key in MODELS or key in _ALIASES:
                raise ValueError(f"model name {key!r} registered twice")
        MODELS[name] = ModelEntry(name, fn, family, input_size, aliases, description or (fn.__doc__ or "").strip())
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def canonical_name(name: str) -> str:
    if name.startswith(FOREIGN_PREFIXES):
        return name
    if name in MODELS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    lowered = {k.lower(): k for k in [*MODELS, *_ALIASES]}
    if name.lower() in lowered:
        return canonical_name(lowered[name.lower()])
    close = difflib.get_close_matches(name, [*MODELS, *_ALIASES], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UserInputError(
        f"unknown model {name!r}.{hint} `kdzoo list models` shows every name; any timm or "
        "torchvision model is available as 'timm:<name>' / 'torchvision:<name>'."
    )


def model_entry(name: str) -> ModelEntry | None:
    name = canonical_name(name)
    return MODELS.get(name)


def create_model(name: str, num_classes: int = 100, *, taps: dict[str, Any] | None = None,
                 taps_where: str = "taps", **kwargs: Any) -> nn.Module:
    """Build a registered model (or ``timm:``/``torchvision:`` one) returning logits from ``forward``.

    ``taps``: module paths of the tap groups (the ``teacher.taps`` / ``student.taps`` config mapping, see
    :func:`kdzoo.models.foreign.tap_spec_from_config`), replacing the family's own; ``taps_where`` is the
    config path errors name. Other keywords go to the constructor."""
    name = canonical_name(name)
    if name.startswith(FOREIGN_PREFIXES):
        model = create_foreign_model(name, num_classes=num_classes, **kwargs)
    else:
        model = MODELS[name].constructor(num_classes=num_classes, **kwargs)
        model.kdzoo_name = name  # type: ignore[assignment]  # lets checkpoints record the architecture
    if taps is not None:
        model.tap_spec = tap_spec_from_config(taps, model, where=taps_where)  # type: ignore[assignment]
    return model


def list_models(family: str | None = None) -> list[ModelEntry]:
    return [e for e in MODELS.values() if family is None or e.family == family]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

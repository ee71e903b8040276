"""Method registry: ``@register_method`` on a Distiller subclass; ``create_distiller`` builds one."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.validation import suggest

METHODS: dict[str, type[Distiller]] = {}


def register_method(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def _ensure_loaded() -> None:
    """Import every method module of this folder, which runs its ``@register_method`` (a new method is one
    new file; nothing else lists it)."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in ("base", "registry", "losses", "init_stage", "projectors", "dense_logits"):
            importlib.import_module(f"kdzoo.methods.{info.name}")


def method_class(name: str) -> type[Distiller]:
    _ensure_loaded()
    if name not in METHODS:
        raise UserInputError(
            f"unknown method {name!r}.{suggest(name, list(METHODS))} Available: {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def list_methods() -> dict[str, type[Distiller]]:
    _ensure_loaded()
    return dict(sorted(METHODS.items()))


def create_distiller(
    method: str, *, student: nn.Module, teacher: nn.Module | None = None, cfg: Any = None, **hparams: Any
) -> Distiller:
    """Build method ``method`` around ``student`` (and ``teacher``); hparams default to the reference."""
    return method_class(method)(student, teacher, cfg, **hparams)

"""Validation of user-supplied values against typed schemas (OmegaConf structured configs).

Below every package that reads user input (config, methods, data, models): it imports only
OmegaConf and :mod:`kdzoo.errors`.

OmegaConf already rejects unknown keys and wrong types; this module runs the key check first so the
message names the full dotted path and suggests the closest valid key, and turns every OmegaConf
error into :class:`UserInputError` (exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdzoo.errors import UserInputError

T = TypeVar("T")


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_keys(schema: Any, values: Any, path: str) -> None:
    """Recursively reject keys the dataclass ``schema`` does not define."""
    if not (dataclasses.is_dataclass(schema) and isinstance(values, (dict, DictConfig))):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise UserInputError(
                f"unknown config key {where!r}.{suggest(str(key), list(fields))} "
                f"Valid keys here: {', '.join(sorted(fields))}."
            )
        field_type = fields[key].type
        sub = _dataclass_of(schema, key, field_type)
        if sub is not None:
            check_keys(sub, value, where)


def _dataclass_of(schema: Any, key: str, field_type: Any) -> type | None:
    default = next(f for f in dataclasses.fields(schema) if f.name == key)
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        candidate = type(default.default_factory())  # type: ignore[misc]
        if dataclasses.is_dataclass(candidate):
            return candidate
    if isinstance(field_type, type) and dataclasses.is_dataclass(field_type):
        return field_type
    return None


def merge_into_schema(schema: type[T], overrides: Any, path: str = "") -> T:
    """Defaults of ``schema`` updated with ``overrides``; returns a real dataclass instance."""
    check_keys(schema, overrides, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(overrides or {}))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise UserInputError(f"invalid value in {path or 'config'}: {_describe(exc)}") from None


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    return f"{key}: {msg}" if key else msg

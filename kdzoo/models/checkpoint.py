"""Load model weights from every checkpoint layout users already have (docs/models.md, "Checkpoints").

One entry point, :func:`load_checkpoint`, for RepDistiller (``{'model', 'epoch', 'accuracy',
'optimizer'}``, ``_best`` with ``best_acc``, ``_last`` with a pickled ``argparse.Namespace``),
mdistiller trainer states (``module.student.*`` / ``module.teacher.*``) and student files, SimKD
(``'model'`` + ``'proj'``), overhaul-distillation (``'state_dict'`` with a ``module.`` prefix), plain
state_dicts and kdzoo's own files. Files are always read with ``weights_only=True``: nothing in a
checkpoint can run code (the one non-tensor class the references pickle, ``argparse.Namespace``, is
allowed explicitly). When weights do not fit, the error lists the keys and names the zoo model whose
ordered (key, shape) signature the file has (docs/models.md, "Checkpoints": unique per architecture once the
classifier's output size is ignored).
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdzoo.errors import CheckpointError
from kdzoo.models.registry import MODELS, canonical_name, create_model
from kdzoo.models.taps import get_tap_spec

SIDES = ("student", "teacher")
_SCALAR_META = (int, float, str, bool)
_MAX_LISTED = 8


# --------------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with kdzoo's errors.

    RepDistiller's ``*_last.pth`` pickles its ``argparse.Namespace``: retried with exactly that class
    allowed. Anything else that is not plain tensors/containers is refused, never unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():
            # A foreign pickle protocol only matters if the load fails, and then our message says why.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(_unpickling_message(path, exc)) from first
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {_short(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - zip, EOF, OS, decoding errors: the file is unusable
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {_short(exc)}") from exc


def _unpickling_message(path: Path, exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if match:
        return (
            f"checkpoint {path} references the Python global {match.group(1)!r}; kdzoo refuses to unpickle it "
            "(loading it could execute arbitrary code). Re-save only the tensors, e.g. "
            "torch.save({'model': model.state_dict()}, path), from a trusted environment."
        )
    return f"checkpoint {path} is unreadable or corrupt (not a torch.save file, or truncated): {_short(exc)}"


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# --------------------------------------------------------------------------------------------------- layouts


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _rename(sd: Mapping[str, Tensor], fn: Callable[[str], str | None]) -> OrderedDict[str, Tensor]:
    """Apply ``fn`` to every key (``None`` drops it), carrying ``_metadata`` (BN versions) along."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in sd.items():
        new = fn(key)
        if new is not None:
            out[new] = value
    metadata = getattr(sd, "_metadata", None)
    if metadata is not None:
        new_meta: OrderedDict[str, Any] = OrderedDict()
        for prefix, value in metadata.items():
            new = fn(prefix + "." if prefix else "")
            if new is not None:
                new_meta[new.rstrip(".")] = value
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def _strip_prefix(prefix: str) -> Callable[[str], str | None]:
    return lambda key: key[len(prefix) :] if key.startswith(prefix) else None


def normalise_state_dict(
    sd: Mapping[str, Tensor], side: str = "student", model_keys: set[str] | None = None
) -> tuple[OrderedDict[str, Tensor], str | None]:
    """Strip DataParallel's ``module.`` and select ``student.``/``teacher.`` of a distiller state.

    Returns the state_dict and the selected side (``None`` when the file holds one model).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    out: OrderedDict[str, Tensor] = sd if isinstance(sd, OrderedDict) else OrderedDict(sd)
    if out and all(k.startswith("module.") for k in out):
        out = _rename(out, _strip_prefix("module."))
    sides_present = {s for s in SIDES if any(k.startswith(s + ".") for k in out)}
    model_has_sides = model_keys is not None and any(k.startswith(tuple(s + "." for s in SIDES)) for k in model_keys)
    if sides_present and not model_has_sides:
        if side not in sides_present:
            raise CheckpointError(
                f"the checkpoint holds a distiller state with {sorted(sides_present)} weights but no {side!r} "
                "weights; pass side=" + " or ".join(repr(s) for s in sorted(sides_present))
            )
        return _rename(out, _strip_prefix(side + ".")), side
    return out, None


def split_checkpoint(
    obj: Any, side: str = "student", model_keys: set[str] | None = None
) -> tuple[OrderedDict[str, Tensor], dict[str, Any]]:
    """Find the weights in a loaded checkpoint object; everything else becomes metadata."""
    if _is_state_dict(obj):
        sd, chosen = normalise_state_dict(obj, side, model_keys)
        return sd, {"format": "mdistiller_trainer" if chosen else "state_dict", "side": chosen}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a dict of weights")
    weights_key = next((k for k in ("model", "state_dict") if _is_state_dict(obj.get(k))), None)
    if weights_key is None:
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        raise CheckpointError(
            f"no model weights found in the checkpoint: expected a 'model' or 'state_dict' entry holding a "
            f"name -> tensor mapping, or such a mapping itself; top-level keys: {keys}"
        )
    sd, chosen = normalise_state_dict(obj[weights_key], side, model_keys)
    if "kdzoo_format" in obj:
        fmt = "kdzoo"
    elif chosen:
        fmt = "mdistiller_trainer"
    elif "proj" in obj:
        fmt = "simkd"
    elif weights_key == "state_dict":
        fmt = "overhaul"
    elif "opt" in obj or "epoch" in obj:
        fmt = "repdistiller"
    else:
        fmt = "model_dict"  # mdistiller student_* files
    meta: dict[str, Any] = {"format": fmt, "side": chosen}
    for key, value in obj.items():
        if key in (weights_key, "optimizer"):
            continue
        if key == "proj" and isinstance(value, Mapping):
            meta["proj"] = value  # SimKD's projector: the caller builds it and loads this
        elif isinstance(value, argparse.Namespace):
            meta[key] = vars(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            meta[key] = value.item()
        elif isinstance(value, _SCALAR_META) or value is None:
            meta[key] = value
    return sd, meta


# --------------------------------------------------------------------------------------------------- loading


StateDictUpgrade = Callable[[nn.Module, Mapping[str, Tensor]], Mapping[str, Tensor]]
_STATE_DICT_UPGRADES: list[tuple[type[nn.Module], StateDictUpgrade]] = []


def register_state_dict_upgrade(model_type: type[nn.Module], upgrade: StateDictUpgrade) -> None:
    """``upgrade(model, state_dict)`` renames a file's legacy keys for every instance of ``model_type`` before
    :func:`load_checkpoint` compares them (torchvision's detectors: kdzoo/models/detection/zoo.py)."""
    _STATE_DICT_UPGRADES.append((model_type, upgrade))


def upgraded_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    for model_type, upgrade in _STATE_DICT_UPGRADES:
        if isinstance(model, model_type):
            return upgrade(model, sd)
    return sd


def load_checkpoint(
    model: nn.Module, path: str | Path, *, side: str = "student", strict: bool = True
) -> dict[str, Any]:
    """Load ``path`` into ``model``; return the file's metadata (``epoch``, ``accuracy``/``best_acc``, ``format``...).

    ``side`` picks the student or teacher of a file that holds both (mdistiller trainer states).
    ``strict=False`` loads what fits and reports the rest under ``missing_keys``,
    ``unexpected_keys`` and ``mismatched_keys`` in the returned dict.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    model_sd = model.state_dict()
    sd, meta = split_checkpoint(obj, side, set(model_sd))
    sd = upgraded_state_dict(model, sd)
    missing, unexpected, mismatched = compare_state_dicts(model_sd, sd)
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(model, path, sd, missing, unexpected, mismatched))
    if mismatched:
        bad = {k for k, _, _ in mismatched}
        sd = _rename(sd, lambda k: None if k in bad else k)
    try:
        result = model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:  # pragma: no cover - compare_state_dicts mirrors torch's checks
        raise CheckpointError(f"checkpoint {path} does not fit {_model_label(model)}: {_short(exc)}") from exc
    meta["path"] = str(path)
    if not strict:
        meta["missing_keys"] = list(result.missing_keys)
        meta["unexpected_keys"] = list(result.unexpected_keys)
        meta["mismatched_keys"] = [k for k, _, _ in mismatched]
    return meta


def compare_state_dicts(
    model_sd: Mapping[str, Tensor], sd: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(missing, unexpected, shape-mismatched) keys of ``sd`` against a model's state_dict.

    Like ``load_state_dict``, a missing BatchNorm ``num_batches_tracked`` is not an error when the
    file predates it (no or old version metadata for that module).
    """
    metadata = getattr(sd, "_metadata", None)
    missing = []
    for key in model_sd:
        if key in sd:
            continue
        if key.endswith("num_batches_tracked"):
            module = key.rsplit(".", 1)[0] if "." in key else ""
            version = None if metadata is None else metadata.get(module, {}).get("version")
            if version is None or version < 2:
                continue
        missing.append(key)
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(model_sd[k].shape))
        for k in sd
        if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    return missing, unexpected, mismatched


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _model_label(model: nn.Module) -> str:
    name = getattr(model, "kdzoo_name", None)
    return f"model {name!r}" if name else f"the {type(model).__name__} model"


def _mismatch_message(
    model: nn.Module,
    path: Path,
    sd: Mapping[str, Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    parts = [f"checkpoint {path} does not fit {_model_label(model)} (strict load)."]
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}.")
    if mismatched:
        shapes = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(shapes)}.")
    matches = identify_architecture(sd, with_num_classes=True)
    if matches:
        names = ", ".join(f"{name!r} (num_classes={n})" for name, n in matches)
        parts.append(f"The file's weights match the registered model(s) {names}: build that model instead.")
    else:
        parts.append("No registered kdzoo model has this file's key/shape signature.")
    hint = _folder_hint(path)
    if hint and hint not in {name for name, _ in matches}:
        parts.append(f"(The folder name suggests {hint!r}; folder names are only a hint.)")
    return " ".join(parts)


def _folder_hint(path: Path) -> str | None:
    """RepDistiller / SimKD folder conventions: ``<model>_vanilla``, ``S:<student>_T:<teacher>_...``."""
    folder = path.parent.name
    candidate = None
    if folder.startswith("S:") and "_T:" in folder:
        candidate = folder[2 : folder.index("_T:")]
    elif "_vanilla" in folder:
        candidate = folder[: folder.index("_vanilla")]
    if not candidate:
        return None
    try:
        return canonical_name(candidate)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------- identification

_Signature = tuple[tuple[str, ...], tuple[tuple[int, ...], ...], str]
_SIGNATURES: dict[tuple[str, ...], dict[str, _Signature]] = {}


def _classifier_prefix(model: nn.Module, keys: list[str]) -> str:
    try:
        return get_tap_spec(model).classifier + "."
    except Exception:  # noqa: BLE001 - no spec: fall back to the last weight's module
        weights = [k for k in keys if k.endswith(".weight")]
        return weights[-1].rsplit(".", 1)[0] + "." if weights else "\0"


def _signature_of(sd: Mapping[str, Tensor], cls_prefix: str) -> _Signature:
    keys = tuple(k for k in sd if not k.endswith("num_batches_tracked"))
    shapes = tuple(tuple(sd[k].shape)[1:] if k.startswith(cls_prefix) else tuple(sd[k].shape) for k in keys)
    return keys, shapes, cls_prefix


def registered_signatures() -> dict[str, _Signature]:
    """Ordered (key, shape) signature of every registered model, built once on the meta device."""
    cache_key = tuple(MODELS)
    if cache_key not in _SIGNATURES:
        signatures: dict[str, _Signature] = {}
        for name in MODELS:
            try:
                with torch.device("meta"):
                    model = create_model(name, num_classes=10)
            except Exception:  # noqa: BLE001, S112 - a model that cannot be built cannot be suggested
                continue
            sd = model.state_dict()
            signatures[name] = _signature_of(sd, _classifier_prefix(model, list(sd)))
        _SIGNATURES.clear()
        _SIGNATURES[cache_key] = signatures
    return _SIGNATURES[cache_key]


def identify_architecture(state_dict: Mapping[str, Tensor], *, with_num_classes: bool = False) -> list[Any]:
    """Registered model names whose ordered (key, shape) list equals the state_dict's, classifier width aside.

    ``module.`` prefixes are stripped and a distiller state is read on its student side. With
    ``with_num_classes=True`` returns ``(name, num_classes)`` pairs, the class count read from the
    file's classifier.
    """
    try:
        sd, _ = normalise_state_dict(state_dict, "student")
    except CheckpointError:  # a distiller state without a student: read its teacher
        sd, _ = normalise_state_dict(state_dict, "teacher")
    keys = tuple(k for k in sd if not k.endswith("num_batches_tracked"))
    found: list[Any] = []
    for name, (ref_keys, ref_shapes, cls_prefix) in registered_signatures().items():
        if ref_keys != keys:
            continue
        if _signature_of(sd, cls_prefix)[1] != ref_shapes:
            continue
        if with_num_classes:
            cls_keys = [k for k in keys if k.startswith(cls_prefix)]
            found.append((name, int(sd[cls_keys[0]].shape[0]) if cls_keys else None))
        else:
            found.append(name)
    return found


# --------------------------------------------------------------------------------------------------- backbones


def imagenet_backbone_state(path: str | Path, prefix: str,
                            is_head: Callable[[str], bool]) -> tuple[OrderedDict[str, Tensor], list[str], dict]:
    """The weights of an ImageNet classifier file that belong to a backbone: the keys under ``prefix`` (stripped),
    the ImageNet head (``is_head``) dropped; returns them, every other key (unexpected), and the whole file's
    state_dict. Segmentation and detection backbones load them strictly after :func:`compare_state_dicts`."""
    sd, _ = split_checkpoint(read_checkpoint(path))
    own: OrderedDict[str, Tensor] = OrderedDict()
    unexpected: list[str] = []
    for key, value in sd.items():
        if is_head(key):
            continue
        if key.startswith(prefix):
            own[key[len(prefix):]] = value
        else:
            unexpected.append(key)
    return own, unexpected, sd


def key_listing(what: str, items: list[str]) -> str:
    """``"N <what>: a, b, ... (+k more)."``, or ``""`` when there are none (error messages)."""
    if not items:
        return ""
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {', '.join(items[:_MAX_LISTED])}{more}."


def mismatch_report(prefix: str, missing: list[str], unexpected: list[str], mismatched: list) -> list[str]:
    """The missing / unexpected / mis-shaped parts of a strict-load error, keys shown with ``prefix``."""
    shapes = [f"{prefix}{k} file {list(a)} vs model {list(b)}" for k, a, b in mismatched]
    return [key_listing("missing key(s)", [prefix + k for k in missing]), key_listing("unexpected key(s)", unexpected),
            key_listing("shape mismatch(es)", shapes)]

"""YAML recipes with ``_base_`` inheritance and dotted ``key=value`` overrides, validated.

``_base_`` (a path or a list of paths, relative to the file) is merged first, then the file itself,
then the command-line overrides; the result is checked against :class:`kdzoo.config.schema.Config`
and the method's own config dataclass. Every problem raises :class:`UserInputError` naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdzoo.config.schema import Config
from kdzoo.data.datasets import dataset_task
from kdzoo.errors import UserInputError
from kdzoo.methods.base import build_method_config, check_task_supported, stage_overrides
from kdzoo.methods.registry import method_class
from kdzoo.models.registry import model_entry
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION
from kdzoo.validation import merge_into_schema


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (``what`` names the file in errors: config, sweep spec, run config); invalid
    YAML or another top-level type is a :class:`UserInputError`. ``yaml.safe_load``: no object construction."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{what} {path} must be a mapping at top level, got {type(data).__name__}")
    return data


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        raise UserInputError(f"config {path} inherits from itself through _base_: {' -> '.join(map(str, chain))}")
    if not path.is_file():
        where = f" (named by _base_ in {chain[-1]})" if chain else ""
        raise UserInputError(f"config file {path} does not exist{where}")
    data = read_yaml_mapping(path, "config")
    bases = data.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, _read_yaml((path.parent / base).resolve(), (*chain, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; values are parsed as YAML (numbers, lists, null)."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UserInputError(f"override {bad[0]!r} is not of the form key=value (e.g. schedule.epochs=1)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise UserInputError(f"cannot parse overrides {list(overrides)}: {exc}") from None


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file with its ``_base_`` chain merged in, not yet validated (a sweep layers several)."""
    return _read_yaml(Path(path).resolve(), ())


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_recipe(path)
    raw = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = merge_into_schema(Config, raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and consistency checks the type system cannot express."""
    data = cfg.data
    checks = [
        (cfg.data.batch_size > 0, "data.batch_size must be positive"),
        (cfg.data.test_batch_size > 0, "data.test_batch_size must be positive"),
        (cfg.data.subset is None or cfg.data.subset > 0, "data.subset must be positive or null"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        ((data.mean is None) == (data.std is None), "set data.mean and data.std together (or neither)"),
        (data.mean is None or len(data.mean) == len(data.std or ()), "data.mean and data.std need one value per "
         "channel each"),
        (data.std is None or all(v > 0 for v in data.std), "data.std values must be positive"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.name in ("sgd", "dot"), f"optim.name must be 'sgd' or 'dot', got {cfg.optim.name!r}"),
        (cfg.schedule.epochs > 0, "schedule.epochs must be positive"),
        (cfg.schedule.gamma > 0, "schedule.gamma must be positive"),
        (cfg.schedule.name in ("multistep", "poly"), f"schedule.name must be multistep or poly, got "
         f"{cfg.schedule.name!r}"),
        (cfg.schedule.power > 0, "schedule.power must be positive"),
        (cfg.schedule.unit in ("epochs", "iterations"), f"schedule.unit must be epochs or iterations, got "
         f"{cfg.schedule.unit!r}"),
        (cfg.schedule.unit == "epochs" or (cfg.schedule.iterations or 0) > 0, "schedule.unit=iterations needs "
         "schedule.iterations (a positive step count, e.g. 180000)"),
        (cfg.schedule.warmup_iters >= 0, "schedule.warmup_iters must be >= 0"),
        (0 < cfg.schedule.warmup_factor <= 1, "schedule.warmup_factor must be in (0, 1]"),
        (cfg.schedule.reference_batch is None or cfg.schedule.reference_batch > 0, "schedule.reference_batch must "
         "be positive"),
        (cfg.optim.head_lr_scale > 0 and cfg.optim.extra_lr_scale > 0, "optim.head_lr_scale and "
         "optim.extra_lr_scale must be positive"),
        (cfg.data.crop_size > 0 and cfg.data.base_size > 0, "data.crop_size and data.base_size must be positive"),
        (cfg.data.num_classes is None or cfg.data.num_classes > 1, "data.num_classes must be at least 2"),
        (list(cfg.schedule.milestones) == sorted(cfg.schedule.milestones), "schedule.milestones must be increasing"),
        (cfg.data.loader in ("torch", "device", "dali", "auto"), f"data.loader must be torch, device, dali or auto, "
         f"got {cfg.data.loader!r}"),
        (len(cfg.data.crop_scale) == 2 and 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1,
         f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(cfg.data.crop_scale)}"),
        (len(cfg.data.crop_ratio) == 2 and 0 < cfg.data.crop_ratio[0] <= cfg.data.crop_ratio[1],
         f"data.crop_ratio must be [min, max] with 0 < min <= max, got {list(cfg.data.crop_ratio)}"),
        (cfg.data.interpolation in ("bilinear", "bicubic"), f"data.interpolation must be bilinear or bicubic, got "
         f"{cfg.data.interpolation!r}"),
        (cfg.data.corrupt in ("stop", "skip"), f"data.corrupt must be 'stop' or 'skip', got {cfg.data.corrupt!r}"),
        (cfg.teacher.cache_topk >= 1, "teacher.cache_topk must be >= 1"),
        (cfg.runtime.nonfinite in ("stop", "skip"), "runtime.nonfinite must be 'stop' or 'skip'"),
        (cfg.runtime.amp_dtype in ("auto", "bf16", "fp16"), "runtime.amp_dtype must be auto, bf16 or fp16"),
        (cfg.runtime.log_interval > 0, "runtime.log_interval must be positive"),
        (cfg.runtime.checkpoint_interval >= 0, "runtime.checkpoint_interval must be >= 0"),
        (cfg.runtime.keep_last >= 1, "runtime.keep_last must be >= 1"),
        (cfg.runtime.eval_every >= 1, "runtime.eval_every must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserInputError(message)
    if "name" not in cfg.method:
        raise UserInputError("method.name is missing (e.g. method.name=kd; `kdzoo list methods` shows all)")
    method_cls = method_class(str(cfg.method["name"]))
    check_task_supported(method_cls, cfg.task)
    if cfg.optim.name == "dot" and cfg.task == DETECTION:
        # DOT splits the task's loss terms from the distillation ones by name (Distiller.task_losses), and a
        # detector's own terms are not declared that way yet.
        raise UserInputError("optim.name=dot is not available for task=detection yet (use optim.name=sgd)")
    data_task = dataset_task(cfg.data.dataset)
    if data_task is not None and data_task != cfg.task:
        raise UserInputError(f"data.dataset={cfg.data.dataset} is a {data_task} dataset, but task={cfg.task} "
                             f"(set task={data_task}, or choose a {cfg.task} dataset)")
    build_method_config(method_cls, dict(cfg.method), {})
    for override in stage_overrides(dict(cfg.method), {}):
        if override.name not in method_cls.declared_stages:
            raise UserInputError(
                f"method.stages names stage {override.name!r}, but {method_cls.name} declares the stages "
                f"{list(method_cls.declared_stages)}"
            )
    check_model_task(cfg.student.name, cfg.task, "student")
    if method_cls.requires_teacher:
        if not cfg.teacher.name:
            raise UserInputError(f"method {method_cls.name!r} distils from a teacher: set teacher.name")
        check_model_task(cfg.teacher.name, cfg.task, "teacher")
        if not cfg.teacher.checkpoint:
            raise UserInputError(
                f"method {method_cls.name!r} needs a trained teacher: set teacher.checkpoint to its weights "
                "(RepDistiller / mdistiller / kdzoo checkpoint or a plain state_dict)"
            )


# Zoo families built for a task other than classification (every other family classifies).
FAMILY_TASKS = {"segmentation": SEGMENTATION, "detection": DETECTION}


def check_model_task(name: str, task: str, role: str) -> None:
    """A known zoo model must be built for the run's task: a segmentation network cannot be trained as a
    classifier and vice versa (foreign ``timm:`` / ``torchvision:`` names are checked when built)."""
    entry = model_entry(name)  # also rejects unknown names, with suggestions
    if entry is None:
        return
    model_task = FAMILY_TASKS.get(entry.family, CLASSIFICATION)
    if model_task == task:
        return
    raise UserInputError(f"{role}.name={name} is a {model_task} model, but task={task} (set task={model_task})")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

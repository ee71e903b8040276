"""Build everything a run needs from a validated config, before anything is written to disk.

Every failure here (missing data, unknown model, missing or mismatched teacher checkpoint, a
method that cannot work with the chosen pair) raises :class:`UserInputError`, so the CLI exits with
code 2 and no run directory exists yet.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.config.schema import Config
from kdzoo.data.bundle import CropReplayLoader
from kdzoo.data.crop_cache import CropCache, CropCacheKey
from kdzoo.data.datasets import DataBundle, build_data
from kdzoo.data.tensor_loader import TensorBatchLoader
from kdzoo.engine.checkpoint_io import load_verified
from kdzoo.engine.crop_cache_build import crop_cache_key
from kdzoo.engine.optim import schedule_epochs
from kdzoo.engine.runtime import resolve_device, seed_everything, set_deterministic
from kdzoo.engine.teacher_cache import TeacherCache, cache_key
from kdzoo.errors import UserInputError
from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import method_class
from kdzoo.models.checkpoint import load_checkpoint
from kdzoo.models.registry import create_model, model_entry
from kdzoo.models.renormalise import renormalise_input
from kdzoo.teachers import resolve_checkpoint
from kdzoo.types import TaskSpec


@dataclass
class RunParts:
    cfg: Config
    device: torch.device
    data: DataBundle
    distiller: Distiller
    rank: int = 0
    world_size: int = 1
    teacher_cache: TeacherCache | None = None  # when configured and usable


def load_weights(model: nn.Module, path: str, role: str) -> dict:
    path = resolve_checkpoint(path)  # `teachers:NAME`: the fetched file, checked against its manifest hash
    if not Path(path).is_file():
        raise UserInputError(f"{role} checkpoint {path} does not exist")
    return load_checkpoint(model, path)


def recorded_model_name(path: str) -> str | None:
    """The architecture a kdzoo export records (``None`` for other files, or a composite export)."""
    if not (Path(path).is_file() and Path(path + ".sha256").is_file()):
        return None
    payload = load_verified(path)
    if payload.get("format") != "kdzoo-model" or payload.get("composite"):
        return None
    return payload.get("model_name")


def load_model_for_eval(
    name: str | None, path: str, num_classes: int, input_shape: tuple[int, ...]
) -> nn.Module:
    """A deployable network from a checkpoint: a plain architecture, or the composite a method exported
    (SimKD: student backbone + projector + teacher classifier), rebuilt from what the export recorded."""
    if not Path(path).is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    composite = None
    model_args: dict[str, Any] = {}
    if Path(path + ".sha256").is_file():
        payload = load_verified(path)
        if payload.get("format") == "kdzoo-model":
            composite = payload.get("composite")
            name = name or payload.get("model_name")
            model_args = dict(payload.get("model_args") or {})  # e.g. a detector's min_size / max_size
    if composite is None:
        if name is None:
            raise UserInputError(f"{path} does not record its architecture: pass --model NAME")
        model = build_model(name, num_classes, input_shape, model_args=model_args)
        load_weights(model, path, "model")
        return model
    model = build_composite(composite, num_classes, input_shape)
    model.load_state_dict(payload["model"])
    return model


def build_composite(composite: dict[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The (untrained) network a method exports, from an export's ``composite`` record (method, its config, both
    architectures and their taps); the caller loads the exported state_dict into it."""
    student = build_model(composite["student_name"], num_classes, input_shape, composite.get("student_taps"),
                          "student")
    teacher = build_model(composite["teacher_name"], num_classes, input_shape, composite.get("teacher_taps"),
                          "teacher")
    method = method_class(composite["method"])
    distiller = method(student, teacher, composite["method_config"], input_shape=input_shape)
    return distiller.export_student()


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], taps: dict[str, Any] | None = None,
                role: str = "model", backbone_checkpoint: str | None = None,
                model_args: dict[str, Any] | None = None) -> nn.Module:
    """``taps``: the config's ``<role>.taps`` module paths (checked against the model's modules here);
    ``backbone_checkpoint``: ImageNet weights for the backbone of a model that has one (segmentation zoo)."""
    entry = model_entry(name)
    if entry is not None and entry.family == "cifar" and tuple(input_shape[1:]) != (entry.input_size,) * 2:
        raise UserInputError(
            f"model {name!r} expects {entry.input_size}x{entry.input_size} inputs, but the dataset's images are "
            f"{input_shape[1]}x{input_shape[2]}"
        )
    kwargs: dict[str, Any] = dict(model_args or {})
    if kwargs and entry is not None:
        accepted = inspect.signature(entry.constructor).parameters
        unknown = sorted(set(kwargs) - set(accepted) - {"num_classes"})
        if unknown:
            raise UserInputError(f"{role}.model_args: model {name!r} takes no argument {unknown[0]!r}; it takes "
                                 f"{sorted(k for k in accepted if k not in ('num_classes', 'backbone_checkpoint'))}")
    if backbone_checkpoint is not None:
        if entry is None or "backbone_checkpoint" not in inspect.signature(entry.constructor).parameters:
            raise UserInputError(f"{role}.backbone_checkpoint is set, but model {name!r} has no separately loaded "
                                 "backbone (the segmentation zoo's models have one); use "
                                 f"{role}.checkpoint for whole-model weights")
        if not Path(backbone_checkpoint).is_file():
            raise UserInputError(f"{role}.backbone_checkpoint {backbone_checkpoint} does not exist")
        kwargs["backbone_checkpoint"] = backbone_checkpoint
    return create_model(name, num_classes=num_classes, taps=taps, taps_where=f"{role}.taps", **kwargs)


def task_spec(cfg: Config) -> TaskSpec:
    """The config's task as the methods see it (which loss scores the student's own output)."""
    return TaskSpec(cfg.task, ignore_index=cfg.data.ignore_index, ce_batch_average=cfg.loss.ce_batch_average)


def prepare_run(cfg: Config, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> RunParts:
    if cfg.runtime.wandb and importlib.util.find_spec("wandb") is None:
        raise UserInputError("runtime.wandb=true needs the wandb package: pip install 'kdzoo[wandb]' (or wandb)")
    device = device or resolve_device(cfg.runtime.device)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    set_deterministic(cfg.runtime.deterministic)
    seed_everything(cfg.experiment.seed)
    method_cls = method_class(str(cfg.method["name"]))
    data = build_data(
        cfg.data, seed=cfg.experiment.seed, device=device, rank=rank, world_size=world_size,
        drop_last=method_cls.needs_fixed_batch_size, strong_view=method_cls.needs_strong_view,
    )
    # Models are built after seeding, so a seed fixes the student's initial weights too.
    student = build_model(cfg.student.name, data.num_classes, data.input_shape, cfg.student.taps, "student",
                          cfg.student.backbone_checkpoint, dict(cfg.student.model_args))
    if cfg.student.checkpoint:
        load_weights(student, cfg.student.checkpoint, "student")
    teacher = None
    if method_cls.requires_teacher or cfg.teacher.name:
        if not cfg.teacher.name or not cfg.teacher.checkpoint:
            raise UserInputError(f"method {method_cls.name!r} needs teacher.name and teacher.checkpoint")
        teacher = build_model(cfg.teacher.name, data.num_classes, data.input_shape, cfg.teacher.taps, "teacher",
                              model_args=dict(cfg.teacher.model_args))
        load_weights(teacher, cfg.teacher.checkpoint, "teacher")
        renormalise_teacher_input(teacher, cfg, data)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    distiller = method_cls(student, teacher, dict(cfg.method), input_shape=data.input_shape,
                           batch_size=cfg.data.batch_size, task=task_spec(cfg))
    distiller.to(device)
    distiller.bind_dataset(data.info)
    if cfg.runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)
    cache = open_teacher_cache(cfg, data, distiller, device) if cfg.teacher.cache else None
    return RunParts(cfg, device, data, distiller, rank, world_size, cache)


def renormalise_teacher_input(teacher: nn.Module, cfg: Config, data: DataBundle) -> None:
    """``teacher.mean`` / ``teacher.std``: the teacher sees every batch in the normalisation it was trained with."""
    mean, std = cfg.teacher.mean, cfg.teacher.std
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise UserInputError("teacher.mean and teacher.std go together: set both to the normalisation the teacher "
                             "was trained with")
    if data.mean is None or data.std is None:
        raise UserInputError(f"teacher.mean / teacher.std: the {cfg.data.dataset} pipeline does not record its "
                             "normalisation, so the teacher's input cannot be renormalised (classification datasets "
                             "can)")
    renormalise_input(teacher, data.mean, data.std, list(mean), list(std))


def cache_key_for(cfg: Config, data: DataBundle) -> Any:
    """The key of the run's teacher cache: the exact view table of an in-memory dataset (:mod:`teacher_cache`)
    or the crop-level cache of a class-folder dataset (:mod:`kdzoo.data.crop_cache`)."""
    if cfg.teacher.mean is not None or cfg.teacher.std is not None:
        raise UserInputError("teacher.cache does not record teacher.mean / teacher.std: run the live teacher "
                             "(unset teacher.cache) when its input is renormalised")
    if not cfg.teacher.name or not cfg.teacher.checkpoint:
        raise UserInputError("the teacher cache needs teacher.name and teacher.checkpoint")
    checkpoint = resolve_checkpoint(cfg.teacher.checkpoint)
    if isinstance(data.train, TensorBatchLoader):
        return cache_key(data.train, cfg.teacher.name, checkpoint, cfg.data.dataset, data.num_classes)
    if isinstance(data.train, CropReplayLoader):
        return crop_cache_key(data.train, teacher_name=cfg.teacher.name, teacher_checkpoint=checkpoint,
                              dataset=cfg.data.dataset, root=cfg.data.root, num_classes=data.num_classes,
                              topk=cfg.teacher.cache_topk)
    raise UserInputError(f"teacher.cache: {cfg.data.dataset} has no teacher cache (in-memory datasets: CIFAR, "
                         "mnist5k; crop-level: imagenet, imagefolder)")


def run_epochs(cfg: Config, data: DataBundle) -> int:
    """The epochs a run trains (what a crop-level cache must hold), from the configured schedule."""
    return schedule_epochs(cfg.schedule, len(data.train))


def open_teacher_cache(cfg: Config, data: DataBundle, distiller: Distiller,
                       device: torch.device) -> TeacherCache | None:
    """The exact view table is looked up by the trainer; a crop-level cache is handed to the loader, which then
    replays its crops and delivers the targets with each batch (``Batch.teacher_logits``)."""
    if distiller.uses_teacher_features:
        warnings.warn(f"{distiller.name} reads teacher features, not only logits: teacher.cache is ignored and the "
                      "live teacher runs", stacklevel=2)
        return None
    key = cache_key_for(cfg, data)
    if isinstance(key, CropCacheKey):
        data.train.replay(CropCache(cfg.teacher.cache, key, run_epochs(cfg, data)))  # type: ignore[attr-defined]
        return None
    return TeacherCache(cfg.teacher.cache, key, device)

"""``kdzoo export``: a trained student as ONNX, TorchScript or safetensors, checked against the PyTorch model.

The exported network is the deployed model alone, exactly as :func:`kdzoo.engine.setup.load_model_for_eval`
rebuilds it for ``kdzoo eval`` (SimKD: the composite of student backbone, projector and teacher classifier). It
takes images already normalised with the training run's mean/std, which every format records in its metadata
(docs/export.md). Each file is written next to a temporary name, loaded back with its own runtime, compared with
the PyTorch model on a random batch, and only then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from kdzoo import __version__
from kdzoo.config.loader import FAMILY_TASKS, load_config
from kdzoo.config.schema import Config
from kdzoo.data.datasets import DATASET_NORMALISATION, DATASETS
from kdzoo.data.detection import DETECTION_DATASETS
from kdzoo.data.segmentation import SEGMENTATION_DATASETS
from kdzoo.engine.checkpoint_io import atomic_write_bytes, load_verified
from kdzoo.engine.setup import build_composite, build_model, load_model_for_eval
from kdzoo.errors import UserInputError
from kdzoo.models.registry import model_entry
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION

try:  # the `export` extra: pip install 'kdzoo[export]'
    import onnxruntime
except ImportError:  # pragma: no cover - exercised only without the extra
    onnxruntime = None

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
RUN_DIR_EXPORTS = ("student_best.pt", "student_last.pt")  # what Trainer.export writes, in order of preference
METADATA_KEY = "kdzoo"  # ONNX metadata_props key, safetensors header key, TorchScript extra file "kdzoo.json"
METADATA_FORMAT = "kdzoo-export"
# max |exported - PyTorch| on the check batch, per unit of max |output| (at least 1)
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-6, "safetensors": 0.0}
EXPORT_BATCH, CHECK_BATCH = 2, 3  # traced at one batch size, checked at another: the batch axis is not baked in
CHANNELS = 3  # every kdzoo dataset delivers 3-channel images (mnist5k repeats its grey channel)
IN_MEMORY_SIZE = 32  # CIFAR-10/100 are 32x32; mnist5k pads its 28x28 digits to 32x32 (kdzoo/data/datasets.py)
TINY_IMAGENET_SIZE = 64
IMAGENET_SIZE = 224  # kdzoo/data/folder.py imagenet_transforms: the evaluation centre crop
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_student` wrote and how closely the written file reproduces the PyTorch model."""

    path: Path
    metadata_path: Path
    checkpoint: Path  # the kdzoo export that was converted (a run directory's student_best.pt or student_last.pt)
    max_abs_diff: float  # on a batch of CHECK_BATCH random inputs
    metadata: dict[str, Any]


def student_checkpoint(source: str | Path) -> Path:
    """A run directory's ``student_best.pt`` (else ``student_last.pt``), or the file itself."""
    path = Path(source)
    if path.is_dir():
        for name in RUN_DIR_EXPORTS:
            if (path / name).is_file():
                return path / name
        raise UserInputError(f"run directory {path} holds no exported student ({' or '.join(RUN_DIR_EXPORTS)}); "
                             "pass the directory of a finished run or a kdzoo student_*.pt file")
    if not path.is_file():
        raise UserInputError(f"{path} does not exist: pass a run directory or a kdzoo student_*.pt file")
    return path


def read_student_export(path: Path) -> dict[str, Any]:
    """The payload of a kdzoo student export (``Trainer.export``): checksum-verified, ``weights_only`` loaded."""
    if not path.with_name(path.name + ".sha256").is_file():
        raise UserInputError(f"{path} is not a kdzoo student export (no {path.name}.sha256 next to it): export "
                             "converts the student_best.pt / student_last.pt files that training writes")
    payload = load_verified(path)
    if not isinstance(payload, dict) or payload.get("format") != "kdzoo-model":
        raise UserInputError(f"{path} is not a kdzoo student export (a training checkpoint or another file); "
                             "use the run's student_best.pt or student_last.pt")
    return payload


def recorded_config(checkpoint: Path) -> Config | None:
    """The config.yaml training wrote next to the export, if it is there."""
    path = checkpoint.parent / "config.yaml"
    return load_config(path) if path.is_file() else None


def dataset_normalisation(cfg: Config) -> tuple[list[float], list[float]] | None:
    """The mean/std the run normalised its images with; ``None`` for detection (the detector normalises itself)
    or a dataset kdzoo does not know."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return list(cfg.data.mean), list(cfg.data.std)
    known = DATASET_NORMALISATION.get(cfg.data.dataset)
    return None if known is None else (list(known[0]), list(known[1]))


def recorded_image_size(cfg: Config) -> int | None:
    """The input size the run evaluated at (segmentation: the validation short side; detection: the nominal
    resize of the detector), ``None`` for a dataset kdzoo does not know."""
    dataset = cfg.data.dataset
    if dataset in DATASETS:
        return IN_MEMORY_SIZE
    if dataset == "tiny_imagenet":
        return TINY_IMAGENET_SIZE
    if dataset in ("imagenet", "imagefolder"):
        return cfg.data.image_size or IMAGENET_SIZE
    if dataset in SEGMENTATION_DATASETS:
        return cfg.data.crop_size
    if dataset in DETECTION_DATASETS:
        return cfg.data.min_size
    return None


def _architecture(payload: dict[str, Any]) -> str:
    composite = payload.get("composite")
    return str(composite["student_name"] if composite else payload["model_name"])


def _task(cfg: Config | None, payload: dict[str, Any]) -> str:
    if cfg is not None:
        return cfg.task
    entry = model_entry(_architecture(payload))
    return CLASSIFICATION if entry is None else FAMILY_TASKS.get(entry.family, CLASSIFICATION)


def _image_size(cfg: Config | None, payload: dict[str, Any], image_size: int | None, checkpoint: Path) -> int:
    if image_size is not None:
        if image_size <= 0:
            raise UserInputError(f"--image-size must be positive, got {image_size}")
        return image_size
    recorded = recorded_image_size(cfg) if cfg is not None else None
    if recorded is not None:
        return recorded
    entry = model_entry(_architecture(payload))
    if entry is not None and entry.family == "cifar":  # fixed pooling: the one size the architecture takes
        return entry.input_size
    where = "has no config.yaml" if cfg is None else f"records data.dataset={cfg.data.dataset}, unknown to kdzoo"
    raise UserInputError(f"the input size of {checkpoint} is not known: its directory {where}; pass --image-size N "
                         "(e.g. 224 for ImageNet models)")


def _normalisation_record(cfg: Config | None, task: str, model: nn.Module) -> dict[str, Any]:
    if task == DETECTION:
        # torchvision detectors normalise (and resize) inside their own transform: they take [0, 1] images.
        transform = model.transform
        return {"normalised": False, "value_range": [0.0, 1.0], "mean": list(transform.image_mean),
                "std": list(transform.image_std), "note": "the detector normalises with mean/std itself"}
    stats = dataset_normalisation(cfg) if cfg is not None else None
    record: dict[str, Any] = {"normalised": True, "mean": None if stats is None else stats[0],
                              "std": None if stats is None else stats[1]}
    record["note"] = ("feed (image / 255 - mean) / std" if stats is not None else
                      "normalise as in training; mean/std unknown: the export had no config.yaml next to it")
    return record


def _check_format(fmt: str, task: str, opset: int | None) -> None:
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserInputError(f"--opset applies to --format onnx only, not {fmt}")
    if fmt != "onnx":
        return
    if task == DETECTION:
        raise UserInputError("kdzoo does not export detectors to ONNX (torchvision's detection models need their "
                             "own ONNX recipe); use --format torchscript or --format safetensors")
    missing = [name for name in ("onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserInputError(f"--format onnx needs {' and '.join(missing)}: pip install 'kdzoo[export]'")
    if opset is not None and opset <= 0:
        raise UserInputError(f"--opset must be positive, got {opset}")


def _output_path(checkpoint: Path, fmt: str, output: str | Path | None) -> Path:
    path = Path(output) if output is not None else checkpoint.with_suffix(FORMATS[fmt])
    if not path.parent.is_dir():
        raise UserInputError(f"output directory {path.parent} does not exist")
    if path.is_dir():
        raise UserInputError(f"--output {path} is a directory; name the file to write")
    if path.resolve() == checkpoint.resolve():
        raise UserInputError(f"--output {path} would overwrite the checkpoint it is exported from")
    return path


def _example_inputs(task: str, size: int) -> tuple[Any, Any]:
    """(export input, check input): random normalised images; a detector's list of [0, 1] images instead."""
    gen = torch.Generator().manual_seed(0)
    if task == DETECTION:
        return [torch.rand(CHANNELS, size, size, generator=gen)], [
            torch.rand(CHANNELS, size, size, generator=gen) for _ in range(CHECK_BATCH)]
    shape = (CHANNELS, size, size)
    return torch.randn(EXPORT_BATCH, *shape, generator=gen), torch.randn(CHECK_BATCH, *shape, generator=gen)


def _tensors(output: Any) -> list[Tensor]:
    """Every tensor of a model output (logits; a detector's per-image boxes/labels/scores), in a fixed order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def max_abs_diff(expected: Any, actual: Any) -> float:
    expected, actual = _tensors(expected), _tensors(actual)
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        return float("inf")
    return max((float((e.double() - a.double()).abs().max()) for e, a in zip(expected, actual) if e.numel()),
               default=0.0)


# ---------------------------------------------------------------------------------------------------- writers


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Errors only: the exporter logs its opset down-conversion attempts (with tracebacks); the opset check below
    reports the outcome in one line instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_onnx(model: nn.Module, example: Tensor, tmp: Path, metadata: dict[str, Any], opset: int | None,
                task: str) -> Callable[[Tensor], Tensor]:
    # The torch.export-based exporter (torch.onnx.export's default since torch 2.9); the batch axis is dynamic,
    # and a segmentation network (fully convolutional) also takes any height and width.
    dims: dict[int, Any] = {0: torch.export.Dim("batch")}
    if task == SEGMENTATION:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    with _quiet_loggers("torch.onnx", "onnxscript"):
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=(dims,))
    produced = program.model.opset_imports.get("")
    if opset is not None and produced != opset:
        raise UserInputError(f"the ONNX exporter cannot write opset {opset} for this model (it wrote {produced}); "
                             "the exporter writes opset 18 and newer natively")
    metadata["onnx_opset"] = produced
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(tmp, external_data=False)  # one self-contained file (weights inline, far below ONNX's 2 GB)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])


def _write_torchscript(model: nn.Module, example: Any, tmp: Path, metadata: dict[str, Any],
                       task: str) -> Callable[[Any], Any]:
    with warnings.catch_warnings():
        # Tracing folds the models' own input-size checks into constants, and torch 2.14 warns that TorchScript is
        # deprecated; both are expected here (docs/export.md).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        if task == DETECTION:
            # torchvision's detectors are written to be scripted (their forward takes a list of images).
            module = torch.jit.script(model)
        else:
            # Traced, not scripted: feature taps (SimKD's composite) run as forward hooks, which tracing records.
            with torch.no_grad():
                module = torch.jit.trace(model, (example,))
        metadata["torchscript"] = "scripted" if task == DETECTION else "traced"
        torch.jit.save(module, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
        loaded = torch.jit.load(str(tmp)).eval()
    if task != DETECTION:
        return loaded

    def detections(images: list[Tensor]) -> Any:
        # A scripted detector returns (losses, detections) whatever its mode, and warns so on every call.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RCNN always returns a", category=UserWarning)
            return loaded(images)[1]

    return detections


def _unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every key with its own storage: safetensors refuses tensors that share memory, and some networks register
    one module under two names (DeepLabV3+'s MobileNetV2 backbone: ``features`` and ``low_level_features``).
    A copy keeps every state_dict key, so ``load_state_dict`` stays strict."""
    seen: set[int] = set()
    out = {}
    for key, value in state_dict.items():
        value = value.detach().contiguous()
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def _write_safetensors(model: nn.Module, tmp: Path, metadata: dict[str, Any]) -> Callable[[Any], Any]:
    state = _unshared(model.state_dict())
    # Serialised in memory and written by Python: the file gets the usual permissions (save_file makes it 0600).
    tmp.write_bytes(save(state, metadata={METADATA_KEY: json.dumps(metadata)}))
    written = load_file(str(tmp))
    if written.keys() != state.keys() or any(
            written[k].dtype != v.dtype or not torch.equal(written[k], v) for k, v in state.items()):
        raise RuntimeError(f"the safetensors file {tmp} does not hold the state_dict bit for bit")
    return rebuild_model(metadata, written)


# ---------------------------------------------------------------------------------------------------- public API


def export_student(source: str | Path, fmt: str, output: str | Path | None = None, *, image_size: int | None = None,
                   opset: int | None = None) -> ExportResult:
    """Convert a kdzoo student export (a run directory or its ``student_*.pt``) to ``fmt``, check the written file
    against the PyTorch model and return where it went. Bad input raises :class:`UserInputError` before anything
    is written."""
    checkpoint = student_checkpoint(source)
    payload = read_student_export(checkpoint)
    cfg = recorded_config(checkpoint)
    task = _task(cfg, payload)
    _check_format(fmt, task, opset)
    size = _image_size(cfg, payload, image_size, checkpoint)
    path = _output_path(checkpoint, fmt, output)
    num_classes = int(payload["num_classes"])
    model = load_model_for_eval(None, str(checkpoint), num_classes, (CHANNELS, size, size)).eval()
    metadata = {
        "format": METADATA_FORMAT, "kdzoo_version": __version__, "export_format": fmt, "source": checkpoint.name,
        "task": task, "model_name": payload["model_name"], "model_args": dict(payload.get("model_args") or {}),
        "num_classes": num_classes, "composite": payload.get("composite"),
        "input": {"name": INPUT_NAME, "shape": ["batch", CHANNELS, size, size],
                  **_normalisation_record(cfg, task, model)},
        "output": _output_description(task),
        "metrics": json.loads(json.dumps(payload.get("metrics") or {}, default=str)),
    }
    example, check = _example_inputs(task, size)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "onnx":
            exported = _write_onnx(model, example, tmp, metadata, opset, task)
        elif fmt == "torchscript":
            exported = _write_torchscript(model, example, tmp, metadata, task)
        else:
            exported = _write_safetensors(model, tmp, metadata)
        with torch.no_grad():
            expected = model(check)
            difference = max_abs_diff(expected, exported(check))
        # Relative to the outputs' scale: onnxruntime's kernels accumulate in another order than PyTorch's, and
        # float32 rounding grows with the magnitude of the logits (a segmentation map's run above 10).
        allowed = TOLERANCE[fmt] * max([1.0, *(float(t.abs().max()) for t in _tensors(expected) if t.numel())])
        if not difference <= allowed:
            raise RuntimeError(f"the {fmt} export of {checkpoint} differs from the PyTorch model by {difference:.3g} "
                               f"(allowed {allowed:.3g}); nothing was written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    metadata_path = path.with_name(path.name + ".json")
    atomic_write_bytes(metadata_path, (json.dumps(metadata, indent=2) + "\n").encode())
    return ExportResult(path, metadata_path, checkpoint, difference, metadata)


def _output_description(task: str) -> str:
    if task == SEGMENTATION:
        return "logits [batch, num_classes, height, width] (the input's height and width)"
    if task == DETECTION:
        return ("one dict per image: boxes [N, 4] (x1, y1, x2, y2 in input pixels), labels [N], scores [N]; "
                "TorchScript returns (losses, detections)")
    return "logits [batch, num_classes]"


def rebuild_model(metadata: dict[str, Any], state_dict: dict[str, Tensor]) -> nn.Module:
    """The PyTorch network an export's metadata describes, with ``state_dict`` loaded strictly, in eval mode."""
    shape = metadata["input"]["shape"]
    input_shape = (int(shape[1]), int(shape[2]), int(shape[3]))
    num_classes = int(metadata["num_classes"])
    if metadata.get("composite"):
        model = build_composite(metadata["composite"], num_classes, input_shape)
    else:
        model = build_model(metadata["model_name"], num_classes, input_shape, model_args=metadata["model_args"])
    model.load_state_dict(state_dict)
    return model.eval()


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if METADATA_KEY not in header:
        raise UserInputError(f"{path} carries no kdzoo metadata: it was not written by `kdzoo export`")
    return json.loads(header[METADATA_KEY])


def load_safetensors(path: str | Path) -> nn.Module:
    """A ``kdzoo export --format safetensors`` file as a PyTorch model (plain architectures and SimKD's composite
    alike), rebuilt from the metadata in the file's header."""
    return rebuild_model(read_safetensors_metadata(path), load_file(str(path)))

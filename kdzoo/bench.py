"""``kdzoo bench``: seconds per training step of every method against the compute floor.

The floor is what no distillation method can avoid: the teacher's forward under ``no_grad`` plus
the student's forward, backward and SGD step on the same batch. Every method's full step (teacher
forward, student forward with its taps, the method's losses, backward through student and extra
modules, SGD step) is timed on the same batch in the same process, so the ratio is meaningful on
any machine. Median of ``steps`` timed steps after ``warmup`` untimed ones.

Each step's floating-point operations are also counted (``torch.utils.flop_counter``: convolutions and
matrix products, forward and backward), so a method whose extra modules add real compute (ReviewKD's
fusion convs, SemCKD's per-pair heads) can be told apart from one that wastes time: the FLOP ratio is
the floor that method cannot go below at the same hardware efficiency.

On a shared or throttling machine the floor measured once at the start drifts away from the rows timed minutes
later. With ``paired`` every method's steps alternate with floor steps (after both warm up) and the row also gets
``× paired floor``: its median over the median of the floor steps timed between its own, so both sides of that
ratio saw the same machine.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdzoo.config.loader import config_from_dict
from kdzoo.engine.run import run_training
from kdzoo.methods.base import Distiller
from kdzoo.methods.registry import create_distiller, list_methods
from kdzoo.models.registry import create_model
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION, Batch, DatasetInfo, Progress, TaskSpec


@dataclass(frozen=True)
class BenchSetting:
    """What one task's benchmark runs by default: the pair, the batch, the image size, the classes."""

    teacher: str
    student: str
    batch_size: int
    image_size: int
    num_classes: int


# Classification: the CIFAR-100 pair every KD paper reports. Segmentation: the overhaul-distillation VOC pair at a
# CPU-sized crop (the recipe's 513 crops and batch 6 are the GPU setting: pass --image-size 513 --batch-size 6).
BENCH_SETTINGS: dict[str, BenchSetting] = {
    CLASSIFICATION: BenchSetting("resnet32x4", "resnet8x4", 64, 32, 100),
    SEGMENTATION: BenchSetting("deeplabv3plus_resnet101", "deeplabv3plus_resnet18", 2, 129, 21),
    # Detection: mdistiller's R101 -> R18 Faster R-CNN pair on 256-pixel images (the detectors resize to it), 2
    # classes + background like the demo's tree crowns, 8 boxes per image.
    DETECTION: BenchSetting("fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn", 2, 256, 2),
}
DETECTION_BOXES_PER_IMAGE = 8


@dataclass
class Timing:
    name: str
    median: float
    low: float
    high: float
    extra_params: int = 0
    peak_mb: float | None = None
    flops: float | None = None
    paired_floor: float | None = None  # median s/step of the floor steps alternated with this row's (``paired``)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_alternating(step: Callable[[], None], reference: Callable[[], None], device: torch.device, warmup: int,
                     steps: int) -> tuple[list[float], list[float]]:
    """``steps`` timings of ``step`` and of ``reference``, taken in turn (which runs first alternates too), after
    ``warmup`` untimed calls of each: the two medians see the same machine state."""
    for _ in range(warmup):
        reference()
        step()
    _sync(device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * steps):
        is_step = (i % 2 == 0) == (i // 2 % 2 == 0)  # step, reference, reference, step, step, reference, ...
        start = time.perf_counter()
        (step if is_step else reference)()
        _sync(device)
        times[is_step].append(time.perf_counter() - start)
    return times[True], times[False]


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process high-water mark (KiB on Linux): monotone, so it bounds, not isolates.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(step: Callable[[], None]) -> float | None:
    """FLOPs of one call of ``step`` (matmul/conv family, forward and backward); None where the counter
    cannot follow the step (double backward through hooks, as Jacobian matching does)."""
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    except RuntimeError:
        return None
    return float(counter.get_total_flops())


def _summary(name: str, times: list[float], device: torch.device, extra: int = 0,
             flops: float | None = None, paired_floor: float | None = None) -> Timing:
    return Timing(name, statistics.median(times), min(times), max(times), extra, _peak_mb(device), flops,
                  paired_floor)


@dataclass
class BenchInputs:
    """The one batch every timed step sees, and the frozen teacher they share."""

    images: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    teacher: torch.nn.Module
    device: torch.device
    memory_format: torch.memory_format
    warmup: int
    steps: int
    task: TaskSpec


def run_bench(
    teacher_name: str = "resnet32x4",
    student_name: str = "resnet8x4",
    batch_size: int = 64,
    device_name: str = "cpu",
    methods: list[str] | None = None,
    warmup: int = 3,
    steps: int = 20,
    num_classes: int = 100,
    with_cache: bool = False,
    channels_last: bool = False,
    task: str = CLASSIFICATION,
    image_size: int = 32,
    paired: bool = False,
) -> list[Timing]:
    """The floor rows, then one row per method (and per cached-teacher variant with ``with_cache``).
    ``channels_last``: every network, method module and the batch in that memory format (the
    ``runtime.channels_last`` fast path), floor included, so the ratios stay like for like. ``task``:
    segmentation benches dense models on ``image_size`` crops with per-pixel labels (methods that do not
    support the task are left out). ``paired``: each method row also timed against floor steps alternated with
    its own (``Timing.paired_floor``)."""
    inputs = _bench_inputs(teacher_name, batch_size, device_name, num_classes, warmup, steps, channels_last,
                           TaskSpec(task), image_size)
    floor_step, student_step = _floor_steps(inputs, student_name, num_classes)
    results = [_timed("floor (teacher fwd + student step)", floor_step, inputs),
               _timed("student only", student_step, inputs)]
    candidates = methods or [n for n, cls in list_methods().items() if task in cls.supported_tasks]
    for name in candidates:
        distiller = _build(name, inputs, student_name, num_classes)
        if distiller is None:
            continue
        results.extend(_method_timings(name, distiller, inputs, with_cache, floor_step if paired else None))
        del distiller
        gc.collect()
    return results


def _bench_inputs(teacher_name: str, batch_size: int, device_name: str, num_classes: int, warmup: int, steps: int,
                  channels_last: bool, task: TaskSpec, image_size: int) -> BenchInputs:
    device = torch.device(device_name)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    index = torch.randint(0, 50000, (batch_size,), device=device)
    if task.name == DETECTION:
        images, target = _detection_batch(batch_size, image_size, num_classes, device)
    else:
        images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
            memory_format=memory_format)
        label_shape = (batch_size, image_size, image_size) if task.name == SEGMENTATION else (batch_size,)
        target = torch.randint(0, num_classes, label_shape, device=device)
    teacher = create_model(teacher_name, num_classes=num_classes, **_model_args(task, image_size)).to(
        device, memory_format=memory_format)
    teacher.eval().requires_grad_(False)
    return BenchInputs(images, target, index, teacher, device, memory_format, warmup, steps, task)


def _model_args(task: TaskSpec, image_size: int) -> dict:
    """Detectors resize inside the model: make them keep the benchmark's image size."""
    return {"min_size": image_size, "max_size": image_size} if task.name == DETECTION else {}


def _detection_batch(batch_size: int, image_size: int, num_classes: int,
                     device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images in [0, 1] and random boxes of 1/8 to 1/2 of the image side, labels 1..K (0 is background)."""
    images = [torch.rand(3, image_size, image_size, device=device) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        n = DETECTION_BOXES_PER_IMAGE
        size = torch.empty(n, 2).uniform_(image_size / 8, image_size / 2)
        corner = torch.rand(n, 2) * (image_size - size)
        boxes = torch.cat([corner, corner + size], dim=1).to(device)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), device=device)})
    return images, targets


def _student_loss(student: torch.nn.Module, inputs: BenchInputs) -> torch.Tensor:
    """The student's own training loss on the bench batch (a detector computes its losses in its forward)."""
    if inputs.task.name == DETECTION:
        return sum(student(inputs.images, inputs.target).values())
    return F.cross_entropy(student(inputs.images), inputs.target)


def _teacher_forward(teacher: torch.nn.Module, inputs: BenchInputs) -> None:
    """The teacher forward every method of the task needs. A detector: its transform, backbone and FPN (what the
    FPN methods read and what the ROI-logit methods' head runs on); its full inference (RPN, NMS, box
    post-processing) is not part of any distillation step."""
    if inputs.task.name == DETECTION:
        teacher.backbone(teacher.transform(inputs.images)[0].tensors)
    else:
        teacher(inputs.images)


def _timed(name: str, step: Callable[[], None], inputs: BenchInputs, extra_params: int = 0,
           floor: Callable[[], None] | None = None) -> Timing:
    """``step``'s timings; with ``floor``, alternated with floor steps whose median becomes ``paired_floor``."""
    if inputs.device.type == "cuda":  # the peak of this row alone (on CPU only the process high-water mark exists)
        torch.cuda.reset_peak_memory_stats(inputs.device)
    paired_floor = None
    if floor is None:
        times = time_steps(step, inputs.device, inputs.warmup, inputs.steps)
    else:
        times, floor_times = time_alternating(step, floor, inputs.device, inputs.warmup, inputs.steps)
        paired_floor = statistics.median(floor_times)
    return _summary(name, times, inputs.device, extra_params, count_flops(step), paired_floor)


def _floor_steps(inputs: BenchInputs, student_name: str,
                 num_classes: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The compute floor (teacher forward + student step) and the student step alone."""
    torch.manual_seed(1)  # every row's student starts from the same weights (a detector's cost depends on them)
    student = create_model(student_name, num_classes=num_classes, **_model_args(inputs.task, _image_size(inputs))).to(
        inputs.device, memory_format=inputs.memory_format)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=5e-4)

    def floor_step(with_teacher: bool) -> Callable[[], None]:
        def step() -> None:
            if with_teacher:
                with torch.no_grad():
                    _teacher_forward(inputs.teacher, inputs)
            loss = _student_loss(student, inputs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    return floor_step(True), floor_step(False)


def _method_timings(name: str, distiller: Distiller, inputs: BenchInputs, with_cache: bool,
                    floor: Callable[[], None] | None) -> list[Timing]:
    """A method's full step in its last stage; with ``with_cache``, also with the teacher logits looked up
    (the kdzoo teacher cache) instead of computed, to compare with "student only". ``floor``: alternate with it."""
    distiller.to(memory_format=inputs.memory_format)
    stage = distiller.training_stages()[-1]
    params = [p for g in distiller.param_groups(stage) for p in g["params"]]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    progress = Progress(epoch=30, epochs=240, stage=stage.name)
    extra = distiller.num_extra_parameters()

    def method_step(batch: Batch) -> Callable[[], None]:
        def step() -> None:
            _, losses = distiller.training_step(batch, progress)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        return step

    distiller.train()
    timings = [_timed(name, method_step(Batch(inputs.images, inputs.target, inputs.index)), inputs, extra, floor)]
    if with_cache and inputs.task.name == CLASSIFICATION and distiller.teacher is not None and \
            not distiller.uses_teacher_features:
        with torch.no_grad():
            cached = inputs.teacher(inputs.images)
        batch = Batch(inputs.images, inputs.target, inputs.index, teacher_logits=cached)
        timings.append(_timed(f"{name} + teacher cache", method_step(batch), inputs, extra, floor))
    return timings


def _image_size(inputs: BenchInputs) -> int:
    return int(inputs.images[0].shape[-1])


def _build(name: str, inputs: BenchInputs, student_name: str, num_classes: int) -> Distiller | None:
    device = inputs.device
    size = _image_size(inputs)
    torch.manual_seed(1)  # the floor's student weights: like-for-like rows
    student = create_model(student_name, num_classes=num_classes, **_model_args(inputs.task, size)).to(device)
    try:
        cls = list_methods()[name]
        distiller = create_distiller(name, student=student, teacher=inputs.teacher if cls.requires_teacher else None,
                                     input_shape=(3, size, size), task=inputs.task)
    except Exception as exc:  # a method that cannot run on this pair is reported, not fatal
        print(f"# {name}: skipped ({exc})", file=sys.stderr)
        return None
    distiller.bind_dataset(DatasetInfo(50000, num_classes, torch.randint(0, num_classes, (50000,))))
    return distiller.to(device)


def format_table(results: list[Timing], header: str) -> str:
    """Markdown table. ``× floor``: time ratio to the first row; ``FLOPs × floor``: the same for counted
    FLOPs (the ratio the step's own compute sets); ``time / FLOPs``: the first over the second, 1.00 when
    the step runs its extra work as efficiently as the floor runs the networks. Rows timed alternately with the
    floor (``paired``) add ``× paired floor`` and its ``time / FLOPs``."""
    floor, floor_flops = results[0].median, results[0].flops
    paired = any(r.paired_floor is not None for r in results)
    columns = ("step | s/step (median) | min | max | × floor | GFLOP/step | FLOPs × floor | time / FLOPs "
               "| extra params | peak MB" + (" | × paired floor | paired time / FLOPs" if paired else ""))
    lines = [header, "", f"| {columns} |", "|---" + "|---:" * (columns.count("|")) + "|"]
    for r in results:
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        ratio = r.median / floor
        flop_ratio = r.flops / floor_flops if r.flops is not None and floor_flops else None
        flop_cells = ([f"{r.flops / 1e9:.4g}", f"{flop_ratio:.3f}", f"{ratio / flop_ratio:.2f}"]
                      if r.flops is not None and flop_ratio else ["-", "-", "-"])
        cells = [r.name, f"{r.median:.4f}", f"{r.low:.4f}", f"{r.high:.4f}", f"{ratio:.2f}", *flop_cells,
                 f"{r.extra_params:,}", peak]
        if paired:
            paired_ratio = r.median / r.paired_floor if r.paired_floor else None
            cells += [f"{paired_ratio:.2f}" if paired_ratio else "-",
                      f"{paired_ratio / flop_ratio:.2f}" if paired_ratio and flop_ratio else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_epoch(method: str, teacher_name: str, student_name: str, batch_size: int, device_name: str,
               data_root: str, samples: int, output_dir: str) -> Timing:
    """One epoch of ``kdzoo train`` over the first ``samples`` CIFAR-100 training images: the real data
    pipeline, trainer, logging and checkpointing (random-weight teacher; no evaluation). Reported as
    s/step over the epoch so it compares with the step timings."""
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        teacher_file = Path(tmp) / "teacher.pth"
        torch.save({"model": create_model(teacher_name, num_classes=100).state_dict()}, teacher_file)
        cfg = config_from_dict({
            "experiment": {"name": "epoch", "output_dir": tmp},
            "data": {"dataset": "cifar100", "root": data_root, "batch_size": batch_size, "subset": samples,
                     "test_subset": batch_size},
            "teacher": {"name": teacher_name, "checkpoint": str(teacher_file)},
            "student": {"name": student_name}, "method": {"name": method},
            "schedule": {"epochs": 1, "milestones": []},
            "runtime": {"device": device_name, "progress": False, "tensorboard": False},
        })
        summary = run_training(cfg)
        record = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    steps = record["step"]
    per_step = record["epoch_time_s"] / steps
    return Timing(f"{method}: full epoch, {samples} images, real pipeline ({steps} steps)", per_step, per_step,
                  per_step, 0, _peak_mb(torch.device(device_name)))

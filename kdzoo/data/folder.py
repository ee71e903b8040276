"""File-based datasets (ImageNet, Tiny-ImageNet, the user's own ImageFolder) through worker processes.

Images are decoded and augmented per sample in ``data.num_workers`` processes with pinned memory
and prefetching. Exact resume still holds: the epoch's sample order comes from a generator seeded
by (seed, epoch), and each sample's augmentation is seeded by (seed, epoch, index), so a sample gets
the same crop whichever worker decodes it and whether or not the epoch was interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdzoo.data.planned_loader import batches_per_rank, rank_share
from kdzoo.errors import UserInputError
from kdzoo.types import Batch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)  # docs/config.md


def scan_class_folders(split_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``split_dir/<class>/**/<image>`` -> (path, class index) pairs, classes sorted by name."""
    if not split_dir.is_dir():
        raise UserInputError(f"image folder {split_dir} does not exist (expected <root>/<split>/<class>/<images>)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise UserInputError(f"image folder {split_dir} has no class sub-folders")
    samples = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((split_dir / c).rglob("*"))
        if p.suffix.lower() in IMG_EXTENSIONS
    ]
    if not samples:
        raise UserInputError(f"image folder {split_dir} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return samples, classes


def scan_tiny_imagenet_val(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """Tiny-ImageNet's val split: flat ``val/images`` labelled by ``val/val_annotations.txt``."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        return scan_class_folders(root / "val")[0]
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise UserInputError(f"{annotations}: malformed line {line!r}")
        samples.append((root / "val" / "images" / parts[0], index[parts[1]]))
    return samples


class SeededImageDataset(Dataset):
    """Decodes one image and applies ``transform`` under a per-(epoch, index) seed."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Any], torch.Tensor], seed: int):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise UserInputError(f"cannot decode image {path}: {exc}") from None
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.transform(img), label, i


class FolderLoader:
    """Same interface as :class:`TensorBatchLoader`: ``len()`` and ``iterate(epoch, start_step)``."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Any], torch.Tensor], *,
                 batch_size: int, num_workers: int, device: torch.device, shuffle: bool, seed: int,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = SeededImageDataset(samples, transform, seed)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> torch.Tensor:
        return rank_share(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          shuffle=self.shuffle)

    def __len__(self) -> int:
        return batches_per_rank(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.dataset.epoch = epoch
        order = self._order(epoch)[start_step * self.batch_size : len(self) * self.batch_size].tolist()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
                            prefetch_factor=4 if self.num_workers else None)
        for images, labels, index in loader:
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                        index.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(epoch=1)


def imagenet_transforms(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> tuple[Callable, Callable]:
    """mdistiller/torchdistill ImageNet recipe: RandomResizedCrop + flip; test Resize(256) + CenterCrop(224)."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    test = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *norm])
    return train, test


def tiny_imagenet_transforms(mean: Sequence[float] = TINY_IMAGENET_MEAN,
                             std: Sequence[float] = TINY_IMAGENET_STD) -> tuple[Callable, Callable]:
    """mdistiller Tiny-ImageNet recipe (docs/config.md): RandomRotation(20) + flip at 64x64."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose([T.RandomRotation(20), T.RandomHorizontalFlip(), *norm]), T.Compose(norm)

"""Exact teacher-output cache for augmentations with a finite set of views.

CIFAR's crop-with-padding-4 + flip has 9 x 9 x 2 = 162 views per image, so a frozen teacher's logits
can be computed once for every (sample, crop offset, flip) and looked up during training instead of
running the teacher: a logits-only method (KD, DKD, DIST, ...) then costs what training the student
alone costs. Stored as fp16 memory-mapped, shape [N, offsets, offsets, flips, C]
(about 1.6 GB for CIFAR-100) as ``logits.npy`` next to ``meta.json``, which records the teacher checkpoint's SHA-256,
the dataset, the augmentation and the normalisation: a cache never silently serves another teacher.
Shared across methods, students and seeds (the view a batch draws is looked up, whatever drew it).

Augmentations without a finite view set (RandomResizedCrop on ImageNet) need the FKD-style
alternative instead: store each sampled crop's parameters with the teacher's top-k logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdzoo.data.crop_cache import check_cache_key, fp16_spacing
from kdzoo.data.tensor_loader import TensorBatchLoader
from kdzoo.digest import file_sha256
from kdzoo.errors import UserInputError

FORMAT = "kdzoo-teacher-cache-v1"


@dataclass
class CacheKey:
    """Everything the cached logits depend on."""

    teacher_name: str
    teacher_sha256: str
    dataset: str
    num_samples: int
    padding: int
    flips: int
    num_classes: int
    mean: list[float]
    std: list[float]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_key(loader: TensorBatchLoader, teacher_name: str, teacher_checkpoint: str, dataset: str,
              num_classes: int) -> CacheKey:
    if loader.augment is None:
        raise UserInputError("the teacher cache needs the crop/flip augmentation (data.augment=true)")
    return CacheKey(
        teacher_name, file_sha256(teacher_checkpoint), dataset, loader.num_samples, loader.augment.padding,
        2 if loader.augment.flip else 1, num_classes,
        [round(float(v), 6) for v in loader.mean.flatten()], [round(float(v), 6) for v in loader.std.flatten()],
    )


def _shape(key: CacheKey) -> tuple[int, ...]:
    offsets = 2 * key.padding + 1
    return (key.num_samples, offsets, offsets, key.flips, key.num_classes)


@torch.no_grad()
def build_cache(teacher: nn.Module, loader: TensorBatchLoader, key: CacheKey, directory: Path,
                batch_size: int = 256, progress: bool = True) -> Path:
    """Run the teacher on every view of every sample and write the cache."""
    directory.mkdir(parents=True, exist_ok=True)
    shape = _shape(key)
    tmp = directory / "logits.f16.tmp"
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    teacher.eval()
    offsets, flips = shape[1], shape[3]
    views = [(y, x, f) for y in range(offsets) for x in range(offsets) for f in range(flips)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=shape[0] * len(views), desc="teacher cache", unit="view")
    device = loader.device
    for start in range(0, shape[0], batch_size):
        index = torch.arange(start, min(start + batch_size, shape[0]), device=device)
        images = loader.images[index]
        for y, x, f in views:
            n = index.numel()
            crop_x = torch.full((n,), x, device=device)
            crop_y = torch.full((n,), y, device=device)
            flip = torch.full((n,), bool(f), device=device)
            logits = teacher(loader.normalize(loader.crop_flip(images, crop_x, crop_y, flip)))
            table[start : start + n, y, x, f] = logits.float().cpu().numpy().astype(np.float16)
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    table.flush()
    del table
    tmp.replace(directory / "logits.npy")
    (directory / "meta.json").write_text(json.dumps({"format": FORMAT, **key.as_dict()}, indent=1))
    return directory


class TeacherCache:
    """Read side: ``lookup(index, view)`` -> fp32 logits of those samples' drawn views."""

    def __init__(self, directory: str | Path, expected: CacheKey, device: torch.device):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file() or not (directory / "logits.npy").is_file():
            raise UserInputError(f"teacher cache {directory} is missing or incomplete: run `kdzoo cache build`")
        check_cache_key(directory, json.loads(meta_path.read_text()), {"format": FORMAT, **expected.as_dict()})
        self.table = np.load(directory / "logits.npy", mmap_mode="r")
        self.device = device

    def lookup(self, index: Tensor, view: Tensor) -> Tensor:
        """``view`` = [B, 3] (crop_x, crop_y, flip) as the loader records it in ``Batch.crop``."""
        idx, v = index.cpu().numpy(), view.cpu().numpy()
        rows = self.table[idx, v[:, 1], v[:, 0], v[:, 2]]
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, non_blocking=True).float()


@torch.no_grad()
def verify_cache(cache: TeacherCache, teacher: nn.Module, loader: TensorBatchLoader, samples: int = 256,
                 seed: int = 0) -> float:
    """Recompute ``samples`` random views with the live teacher; returns the largest difference in
    units of fp16 rounding of the live value (<= 1 means the cache is exact to its storage precision)."""
    gen = torch.Generator().manual_seed(seed)
    n, offsets, _, flips, _ = cache.table.shape
    index = torch.randint(0, n, (samples,), generator=gen)
    view = torch.stack([torch.randint(0, offsets, (samples,), generator=gen),
                        torch.randint(0, offsets, (samples,), generator=gen),
                        torch.randint(0, flips, (samples,), generator=gen)], dim=1)
    teacher.eval()
    device = loader.device
    images = loader.images[index.to(device)]
    live = teacher(loader.normalize(loader.crop_flip(images, view[:, 0].to(device), view[:, 1].to(device),
                                                     view[:, 2].bool().to(device)))).float().cpu()
    cached = cache.lookup(index, view).cpu()
    # The cached value is the live one rounded to fp16.
    return float(((cached - live).abs() / fp16_spacing(live)).max())

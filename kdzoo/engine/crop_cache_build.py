"""Building and checking the crop-level teacher cache of a class-folder dataset (``kdzoo cache build`` /
``verify``; the format and the reconstruction are :mod:`kdzoo.data.crop_cache`).

For each requested epoch every training image is read in index order with the crop the run's sample plan draws
for it in that epoch (seed, epoch, index), the frozen teacher runs in eval mode on the crop, and the crop's
parameters with the teacher's top-k logits go to that epoch's shard. Training replays those parameters, so its
crops are exactly the ones the teacher saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdzoo.data.crop_cache import CropCache, CropCacheKey, EpochShardWriter, fp16_spacing, top_and_tail, write_meta
from kdzoo.data.folder import FolderLoader, collate_folder
from kdzoo.digest import file_sha256
from kdzoo.errors import UserInputError


def samples_sha256(samples: Sequence[tuple[Path, int]], root: str | Path) -> str:
    """Digest of the training list (paths relative to the data root, labels, in index order): a cache row is
    an index, so any change to the list invalidates the cache."""
    digest = hashlib.sha256()
    root = Path(root)
    for path, label in samples:
        try:
            name = Path(path).relative_to(root).as_posix()
        except ValueError:
            name = Path(path).as_posix()
        digest.update(f"{name}\t{label}\n".encode())
    return digest.hexdigest()


def crop_cache_key(loader: FolderLoader, *, teacher_name: str, teacher_checkpoint: str, dataset: str, root: str,
                   num_classes: int, topk: int) -> CropCacheKey:
    pipeline = loader.pipeline
    if pipeline.crop is None:
        raise UserInputError("the crop-level teacher cache needs the RandomResizedCrop pipeline (imagenet or "
                             "imagefolder with data.augment=true)")
    if not 1 <= topk <= num_classes:
        raise UserInputError(f"teacher.cache_topk={topk}: must be between 1 and the {num_classes} classes")
    return CropCacheKey(
        teacher_name=teacher_name, teacher_sha256=file_sha256(teacher_checkpoint), dataset=dataset,
        samples_sha256=samples_sha256(loader.samples, root), num_samples=len(loader.samples),
        num_classes=num_classes, topk=topk, crop=pipeline.crop.as_dict(),
        mean=[round(float(v), 6) for v in pipeline.mean], std=[round(float(v), 6) for v in pipeline.std],
    )


def parse_epochs(text: str | None, default_last: int) -> list[int]:
    """``"1-100"``, ``"7"`` or None (1 to ``default_last``)."""
    if not text:
        return list(range(1, default_last + 1))
    try:
        first, _, last = text.partition("-")
        epochs = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserInputError(f"--epochs {text!r}: expected FIRST-LAST (e.g. 1-100) or one epoch number") from None
    if not epochs or epochs[0] < 1:
        raise UserInputError(f"--epochs {text!r}: epochs count from 1 and FIRST must not exceed LAST")
    return epochs


@torch.no_grad()
def build_crop_cache(teacher: nn.Module, loader: FolderLoader, key: CropCacheKey, directory: Path,
                     epochs: Sequence[int], *, build_seed: int, progress: bool = True) -> list[Path]:
    """Write one shard per epoch of ``epochs`` (each visible only when complete); returns their paths."""
    write_meta(directory, key, build_seed)
    ordered = loader.in_index_order()
    teacher.eval()
    bar = None
    if progress:
        bar = tqdm(total=len(epochs) * len(ordered.samples), desc="crop cache", unit="image")
    shards = []
    for epoch in epochs:
        writer = EpochShardWriter(directory, key, epoch)
        for batch in ordered.iterate(epoch):
            logits = teacher(batch.image)
            writer.write(batch.index.cpu().numpy(), batch.crop.cpu().numpy().astype(np.int64), logits, key.topk)
            if bar is not None:
                bar.update(len(batch.index))
        shards.append(writer.close(skipped=ordered.skipped))
    if bar is not None:
        bar.close()
    return shards


@dataclass
class CropCacheCheck:
    """How far the cache is from the live teacher on ``samples`` replayed crops of one epoch."""

    samples: int
    top_fp16_steps: float  # largest |cached - live| of the top-k logits, in fp16 spacings of the live value
    tail_lse_abs: float  # largest |cached - live| tail log-sum-exp
    tail_mass_max: float  # the teacher's largest probability mass outside its top k (T = 1)
    prob_l1_max: float  # largest per-sample L1 distance of the reconstructed vs live softmax (T = 1)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def verify_crop_cache(cache: CropCache, teacher: nn.Module, loader: FolderLoader, *, epoch: int = 1,
                      samples: int = 256, seed: int = 0) -> CropCacheCheck:
    """Recompute ``samples`` random images of ``epoch`` on their replayed crops with the live teacher.

    The exactness bound (docs/config.md, Crop-level teacher cache): the top-k logits within one fp16 spacing,
    and the per-sample softmax L1 distance at T = 1 at most twice the teacher's tail mass (plus fp16 rounding):
    the stored classes keep their probability, the tail's mass is spread evenly. The KD gradient on the student's
    logits at T = 1 is q - p, so its per-sample L1 error obeys the same bound."""
    ordered = loader.in_index_order()
    ordered.replay(cache)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(ordered.samples), generator=generator)[:samples].sort().values.tolist()
    ordered.dataset.epoch = epoch
    items = [ordered.dataset[i] for i in picked]
    batch = ordered.to_batch(*collate_folder(items))
    if batch is None:
        raise UserInputError("no decodable image among the verified samples")
    teacher.eval()
    live = teacher(batch.image).float()
    cached = batch.teacher_logits
    k = cache.key.topk
    values, classes, live_tail = top_and_tail(live, k)
    stored = cached.gather(1, classes)
    p_live, p_cached = live.softmax(dim=1), cached.softmax(dim=1)
    tail_mass = 1 - p_live.gather(1, classes).sum(dim=1)
    tail_cached = torch.logsumexp(cached.scatter(1, classes, float("-inf")), dim=1) if k < live.shape[1] else None
    return CropCacheCheck(
        samples=len(batch.index),
        top_fp16_steps=float(((stored - values).abs() / fp16_spacing(values)).max()),
        tail_lse_abs=0.0 if tail_cached is None else float((tail_cached - live_tail).abs().max()),
        tail_mass_max=float(tail_mass.max()),
        prob_l1_max=float((p_cached - p_live).abs().sum(dim=1).max()),
    )

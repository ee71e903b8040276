"""The shared skeleton of the file-based loaders whose batches are planned up front (segmentation, detection): a
subclass lists the epoch's batches of sample indices as a pure function of the epoch, so ``len()`` is known
and ``iterate(epoch, start_step)`` resumes at any step; worker processes decode and augment the samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kdzoo.types import Batch


class PlannedBatchLoader:
    """Subclasses implement :meth:`batches` and :meth:`to_batch` (the collated worker output -> a device
    :class:`Batch`). ``dataset.epoch`` is set before each epoch: its per-sample seeds depend on it."""

    collate_fn: Callable[[list], Any] | None = None

    def __init__(self, dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.device = torch.device(device)

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def to_batch(self, collated: Any) -> Batch:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.batches(1))

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.dataset.epoch = epoch  # type: ignore[attr-defined]
        batches = self.batches(epoch)[start_step:]
        if not batches:
            return
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=type(self).collate_fn, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers else None)
        for collated in loader:
            yield self.to_batch(collated)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(epoch=1)

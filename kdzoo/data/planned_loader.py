"""The shared skeleton of the file-based loaders whose batches are planned up front (segmentation, detection): a
subclass lists the epoch's batches of sample indices as a pure function of the epoch, so ``len()`` is known
and ``iterate(epoch, start_step)`` resumes at any step; worker processes decode and augment the samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdzoo.data.tensor_loader import _epoch_generator
from kdzoo.types import Batch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: the folder, segmentation and detection datasets seed
    a sample's random draws with it, so a sample's augmentation does not depend on the worker that reads it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def rank_share(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> Tensor:
    """This process's sample indices for ``epoch``: the epoch's permutation (seeded by (seed, epoch)), padded by
    repetition to a multiple of ``world_size``, every ``world_size``-th entry from ``rank`` (DistributedSampler's
    rule), so every process gets the same count and the plan is a pure function of the epoch."""
    n = num_samples
    order = torch.randperm(n, generator=_epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    per_rank = -(-n // world_size)
    order = torch.cat([order, order[: per_rank * world_size - n]])
    return order[rank::world_size]


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches each process iterates per epoch under :func:`rank_share`."""
    per_rank = -(-num_samples // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


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

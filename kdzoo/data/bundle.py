"""What every dataset builder returns: the loaders and the facts the rest of a run needs. A leaf of the data
layer, so each task's dataset module (classification, segmentation) can build one without importing the
others."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from kdzoo.types import Batch, DatasetInfo


class TrainLoader(Protocol):
    def __len__(self) -> int: ...
    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    train: TrainLoader
    test: Iterable[Batch]
    info: DatasetInfo
    input_shape: tuple[int, int, int]
    num_classes: int
    # True when each DDP process holds only its share of the evaluation split (the evaluator then all-reduces
    # its counts); False when every process evaluates the whole split.
    test_sharded: bool = False
    # The per-channel mean / std the loaders normalise images with (None where this is not recorded: the
    # segmentation and detection pipelines); a teacher trained with others gets renormalised input (teacher.mean).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

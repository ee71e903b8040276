"""What every dataset builder returns: the loaders and the facts the rest of a run needs. A leaf of the data
layer, so each task's dataset module (classification, segmentation) can build one without importing the
others."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kdzoo.types import Batch, DatasetInfo


class TrainLoader(Protocol):
    def __len__(self) -> int: ...
    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@runtime_checkable
class CropReplayLoader(Protocol):
    """A class-folder loader (torch, device or DALI backend): its crops can come from a crop-level teacher cache
    (``replay``), and ``in_index_order`` reads every sample once in index order (building that cache)."""

    pipeline: Any
    samples: list[tuple[Path, int]]

    def __len__(self) -> int: ...
    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...
    def replay(self, cache: Any) -> None: ...
    def in_index_order(self, batch_size: int | None = None) -> Any: ...


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

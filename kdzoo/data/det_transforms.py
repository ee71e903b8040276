"""Image + box transforms for object detection, drawn from a per-sample RNG, and aspect-ratio grouping.

The recipe is torchvision's detection reference (pytorch/vision ``references/detection/presets.py``,
``DetectionPresetTrain(data_augmentation="hflip")``: RandomHorizontalFlip(0.5) then conversion to a float
image; ``DetectionPresetEval``: conversion only). Nothing is resized here: torchvision's detectors resize
(``min_size`` / ``max_size``) and normalise inside the model (``GeneralizedRCNNTransform``), so the loader
hands over each image at its own size, with boxes in that image's absolute pixel coordinates.

Aspect-ratio grouping follows ``references/detection/group_by_aspect_ratio.py`` (``create_aspect_ratio_groups``
and ``GroupedBatchSampler``), rewritten as a pure function of the epoch's sample order so the number of batches
is known before the epoch and an interrupted epoch can be replayed from any step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy boxes of an image ``width`` pixels wide, mirrored left-right (x -> width - x; x0 and x1 swap)."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def random_hflip(image: np.ndarray, boxes: np.ndarray, rng: random.Random,
                 p: float = 0.5) -> tuple[np.ndarray, np.ndarray, bool]:
    """``image`` [H, W, 3] and its xyxy ``boxes``, flipped left-right with probability ``p`` (one draw)."""
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1]), hflip_boxes(boxes, image.shape[1]), True
    return image, boxes, False


def aspect_ratio_bins(factor: int) -> list[float]:
    """Bin edges of width/height: ``2 ** linspace(-1, 1, 2 * factor + 1)`` for ``factor > 0``, else ``[1.0]``
    (two groups, portrait < 1 <= landscape), as ``create_aspect_ratio_groups(k=factor)``."""
    if factor > 0:
        return (2.0 ** np.linspace(-1.0, 1.0, 2 * factor + 1)).tolist()
    return [1.0]


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], factor: int = 0) -> list[int]:
    """Group id of each (width, height): ``np.digitize(width / height, aspect_ratio_bins(factor))``.
    ``factor < 0`` puts every image in group 0 (no grouping)."""
    if factor < 0:
        return [0] * len(sizes)
    ratios = np.array([w / h for w, h in sizes], dtype=np.float64)
    return np.digitize(ratios, aspect_ratio_bins(factor)).tolist()


def grouped_batches(order: Sequence[int], groups: Sequence[int], batch_size: int,
                    drop_last: bool) -> list[list[int]]:
    """Batches drawn within aspect-ratio groups, from one epoch's sample ``order``.

    Walking ``order``, each sample joins its group's buffer and a full buffer becomes a batch (the
    GroupedBatchSampler idea). What is left in the buffers at the end is laid out group after group and cut
    into ``batch_size`` pieces, so the count is exactly ``len(order) // batch_size`` with ``drop_last`` (the
    last partial piece is dropped) and ``ceil(len(order) / batch_size)`` without: a function of the sample
    count alone, the same on every DDP rank. Only those few leftover batches may mix groups (torchvision pads
    such batches by repeating samples; mixing keeps every sample exactly once).
    """
    buffers: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for i in order:
        buf = buffers.setdefault(groups[i], [])
        buf.append(i)
        if len(buf) == batch_size:
            batches.append(list(buf))
            buf.clear()
    rest = [i for g in sorted(buffers) for i in buffers[g]]
    stop = len(rest) - len(rest) % batch_size if drop_last else len(rest)
    batches.extend(rest[j: j + batch_size] for j in range(0, stop, batch_size))
    return batches

"""The crop-level teacher cache for class-folder datasets (FKD: Shen & Xing, "A Fast Knowledge Distillation
Framework for Visual Recognition", ECCV 2022): for every image and epoch, the RandomResizedCrop + flip
parameters that epoch draws and the frozen teacher's top-k logits on that crop. Training replays exactly those
crops and reads the targets instead of running the teacher (docs/config.md, Crop-level teacher cache).

On disk (``kdzoo cache build`` writes it; ``kdzoo/engine/crop_cache_build.py``)::

    DIR/meta.json                  the key below: teacher checkpoint SHA-256, sample list digest, crop spec, ...
    DIR/epoch_0001/params.npy      uint16 [N, 5]  top, left, height, width, flip (JPEG sides are < 65536)
    DIR/epoch_0001/top_values.npy  fp16   [N, k]  the k largest logits, largest first
    DIR/epoch_0001/top_indices.npy int16  [N, k]  their classes (int32 beyond 32,767 classes)
    DIR/epoch_0001/tail_lse.npy    fp32   [N]     log-sum-exp of the other C - k logits (-inf when k = C)

One directory per epoch ("shard"): each is written under a temporary name and renamed when complete, so an
interrupted build leaves no half-written epoch, and disjoint epoch ranges can be built on different machines.
ImageNet-1k at k = 10 (:func:`bytes_per_sample`): params 10 + values 20 + indices 20 + tail 4 = 54 bytes per
image and epoch, 69.2 MB per epoch for its 1,281,167 training images, 6.9 GB for a 100-epoch run.

Reconstruction (:func:`reconstruct_logits`): the k stored logits, and every other class at the same value
``tail_lse - log(C - k)``, so the softmax at temperature 1 gives the top-k classes their exact probability and
spreads the rest of the mass evenly over the others — FKD's "marginal smoothing" soft labels, kept as logits so
a method's temperature still applies. With k = C the reconstruction is the teacher's logits to fp16 rounding.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdzoo.errors import UserInputError

FORMAT = "kdzoo-crop-cache-v1"
ARRAYS = ("params", "top_values", "top_indices", "tail_lse")


@dataclass
class CropCacheKey:
    """Everything the cached crops and targets depend on: a cache never serves another teacher, another sample
    list or another augmentation."""

    teacher_name: str
    teacher_sha256: str
    dataset: str
    samples_sha256: str
    num_samples: int
    num_classes: int
    topk: int
    crop: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_dir(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}"


def index_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def bytes_per_sample(topk: int, num_classes: int) -> int:
    """Storage of one image in one epoch."""
    return 5 * 2 + topk * 2 + topk * np.dtype(index_dtype(num_classes)).itemsize + 4


def top_and_tail(logits: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """What the cache stores of fp32 logits [B, C]: the ``topk`` largest [B, k] (largest first), their classes
    [B, k] and the log-sum-exp of the other C - k logits [B] (-inf when k = C)."""
    logits = logits.float()
    values, classes = logits.topk(topk, dim=1)
    return values, classes, torch.logsumexp(logits.scatter(1, classes, float("-inf")), dim=1)


class EpochShardWriter:
    """Writes one epoch's shard; ``write`` takes rows by sample index, ``close`` makes the shard visible."""

    def __init__(self, directory: Path, key: CropCacheKey, epoch: int):
        self.final = epoch_dir(directory, epoch)
        self.tmp = directory / f".epoch_{epoch:04d}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        n, k = key.num_samples, key.topk
        shapes = {"params": ((n, 5), np.uint16), "top_values": ((n, k), np.float16),
                  "top_indices": ((n, k), index_dtype(key.num_classes)), "tail_lse": ((n,), np.float32)}
        self.arrays = {name: np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                       for name, (shape, dtype) in shapes.items()}
        self.written = np.zeros(n, dtype=bool)

    def write(self, index: np.ndarray, params: np.ndarray, logits: Tensor, topk: int) -> None:
        """Rows ``index``: their crop parameters and the teacher's fp32 logits [B, C] on those crops."""
        if params.max(initial=0) > np.iinfo(np.uint16).max:
            raise UserInputError("an image side exceeds 65,535 pixels: the crop cache stores sides as uint16")
        values, classes, tail_lse = top_and_tail(logits, topk)
        self.arrays["params"][index] = params
        self.arrays["top_values"][index] = values.cpu().numpy().astype(np.float16)
        self.arrays["top_indices"][index] = classes.cpu().numpy()
        self.arrays["tail_lse"][index] = tail_lse.cpu().numpy()
        self.written[index] = True

    def close(self, skipped: int = 0) -> Path:
        """``skipped``: undecodable images left out (``data.corrupt=skip``); training skips them too."""
        if int((~self.written).sum()) != skipped:
            raise RuntimeError(f"crop cache shard {self.final.name}: {int((~self.written).sum())} samples not written "
                               f"({skipped} skipped as undecodable)")
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.tmp.replace(self.final)
        return self.final


def write_meta(directory: Path, key: CropCacheKey, build_seed: int) -> None:
    """meta.json, before any shard: a build into a directory holding another key's shards is refused. The build's
    seed (which drew the crops) is recorded but not part of the key: training replays the stored crops whatever
    its own seed, as FKD's soft labels are reused across runs."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / "meta.json"
    if meta.is_file():
        check_meta(directory, key)
        return
    meta.write_text(json.dumps({"format": FORMAT, **key.as_dict(), "build_seed": build_seed}, indent=1))


def check_cache_key(directory: Path, meta: dict[str, Any], wanted: dict[str, Any]) -> None:
    """A teacher cache's recorded ``meta`` holds every entry of ``wanted`` (the run's key); else a UserInputError
    naming what differs. Shared by the exact view table (:mod:`kdzoo.engine.teacher_cache`) and this cache."""
    wrong = [k for k in wanted if meta.get(k) != wanted[k]]
    if wrong:
        details = "; ".join(f"{k}: cache {meta.get(k)!r} vs run {wanted[k]!r}" for k in wrong[:4])
        raise UserInputError(f"teacher cache {directory} was built for another setting ({details}); rebuild it "
                             "(`kdzoo cache build`) or point teacher.cache elsewhere")


def fp16_spacing(x: Tensor) -> Tensor:
    """The fp16 spacing at |x|, 2^(floor(log2|x|) - 10) (normal range): the unit in which a cached fp16 value is
    compared with the live one it rounds."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-14))) - 10)


def check_meta(directory: Path, expected: CropCacheKey) -> None:
    """The cache at ``directory`` was built for ``expected``; else a UserInputError naming what differs."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise UserInputError(f"teacher cache {directory} is missing: run `kdzoo cache build` with this config")
    check_cache_key(directory, json.loads(meta_path.read_text()), {"format": FORMAT, **expected.as_dict()})


class CropCache:
    """Read side, for a loader's dataset (picklable: worker processes open the memory maps themselves)."""

    def __init__(self, directory: str | Path, expected: CropCacheKey, epochs: int):
        self.directory = Path(directory)
        check_meta(self.directory, expected)
        missing = [e for e in range(1, epochs + 1)
                   if not all((epoch_dir(self.directory, e) / f"{a}.npy").is_file() for a in ARRAYS)]
        if missing:
            shown = ", ".join(str(e) for e in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise UserInputError(f"teacher cache {self.directory} lacks epoch(s) {shown} of the {epochs} this run "
                                 f"trains: `kdzoo cache build ... --epochs 1-{epochs}`")
        self.key = expected
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "key": self.key, "_open": {}}

    def _epoch(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._open:
            self._open = {epoch: {a: np.load(epoch_dir(self.directory, epoch) / f"{a}.npy", mmap_mode="r")
                                  for a in ARRAYS}}
        return self._open[epoch]

    def params(self, epoch: int, index: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self._epoch(epoch)["params"][index])

    def targets(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, float]:
        arrays = self._epoch(epoch)
        return (np.asarray(arrays["top_values"][index]), np.asarray(arrays["top_indices"][index], dtype=np.int64),
                float(arrays["tail_lse"][index]))


def reconstruct_logits(values: Tensor, classes: Tensor, tail_lse: Tensor, num_classes: int) -> Tensor:
    """[B, k] top logits, their [B, k] classes and [B] tail log-sum-exp -> [B, C] fp32 logits (module docstring)."""
    k = values.shape[1]
    fill = torch.zeros_like(tail_lse) if k == num_classes else tail_lse - float(np.log(num_classes - k))
    out = fill.float().unsqueeze(1).expand(-1, num_classes).clone()
    return out.scatter_(1, classes.long(), values.float())

"""File-based datasets (ImageNet, Tiny-ImageNet, the user's own ImageFolder) through worker processes.

Three ways to decode (``data.loader``, docs/config.md, ImageNet loading), one sample plan:

- ``torch``: workers decode with PIL and augment per sample (torchvision's transforms), the reference;
- ``device``: workers only read the files (and a JPEG's header, for its size); the batch is decoded on the run's
  device in one call (``torchvision.io.decode_jpeg`` on a list: nvJPEG on CUDA) and cropped, resized, flipped and
  normalised there (:class:`TorchDeviceAugment`);
- ``dali``: the same worker output, decoded and augmented by an NVIDIA DALI pipeline
  (:mod:`kdzoo.data.dali_augment`).

Both draw each sample's RandomResizedCrop + flip as explicit parameters from a generator seeded by (seed, epoch,
index) (:mod:`kdzoo.data.resized_crop`), so the same sample gets the same crop on either backend, whichever worker
reads it and whether or not the epoch was interrupted; ``Batch.crop`` carries them. With a crop-level teacher
cache (:mod:`kdzoo.data.crop_cache`) the parameters are read from the cache instead, with the teacher's targets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_jpeg

from kdzoo.data.crop_cache import CropCache, reconstruct_logits
from kdzoo.data.planned_loader import batches_per_rank, rank_share, sample_seed
from kdzoo.data.resized_crop import (
    NO_CROP,
    ResizedCropSpec,
    crop_pil,
    crop_tensors,
    draw_crop,
    resize_centre_crop_tensors,
)
from kdzoo.errors import UserInputError
from kdzoo.types import Batch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)  # docs/config.md
JPEG_MAGIC = b"\xff\xd8\xff"
# Pixel modes torchvision's JPEG decoder turns into RGB itself; others (CMYK, YCCK) are decoded with PIL.
DEVICE_DECODABLE_MODES = ("RGB", "L")


def scan_class_folders(split_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``split_dir/<class>/**/<image>`` -> (path, class index) pairs, classes sorted by name. A class folder
    without images is an error (its label would exist but never be trained), as in torchvision's ImageFolder."""
    if not split_dir.is_dir():
        raise UserInputError(f"image folder {split_dir} does not exist (expected <root>/<split>/<class>/<images>)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise UserInputError(f"image folder {split_dir} has no class sub-folders")
    per_class = [[p for p in sorted((split_dir / c).rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS]
                 for c in classes]
    empty = [c for c, files in zip(classes, per_class) if not files]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise UserInputError(f"image folder {split_dir}: class folder(s) without images ({', '.join(IMG_EXTENSIONS)}):"
                             f" {shown}; remove them or add their images")
    samples = [(p, i) for i, files in enumerate(per_class) for p in files]
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


@dataclass(frozen=True)
class FolderPipeline:
    """How one split's images become tensors.

    ``crop``: the training RandomResizedCrop + flip (parameters per sample); else ``transform`` (a torchvision
    transform on PIL images, ending in ToTensor + Normalize: evaluation, Tiny-ImageNet's rotation) or, decoded on
    the device, the evaluation resize (shorter side ``resize``) + centre crop ``size``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int
    crop: ResizedCropSpec | None = None
    transform: Callable[[Any], Tensor] | None = None
    resize: int | None = None
    interpolation: str = "bilinear"


class FolderDataset(Dataset):
    """Sample ``i`` of ``samples`` in the current ``epoch``: (pixels or file bytes, label, index, crop parameters,
    error message ('' when decodable), cached teacher targets or None)."""

    def __init__(self, samples: list[tuple[Path, int]], pipeline: FolderPipeline, seed: int, *,
                 decode_on_device: bool = False):
        self.samples, self.pipeline, self.seed = samples, pipeline, seed
        self.decode_on_device = decode_on_device
        self.epoch = 0
        self.replay: CropCache | None = None
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(pipeline.mean, pipeline.std)])

    def __len__(self) -> int:
        return len(self.samples)

    def crop_params(self, i: int, width: int, height: int) -> tuple[int, ...]:
        if self.replay is not None:
            return self.replay.params(self.epoch, i)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        return draw_crop(width, height, self.pipeline.crop, generator)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int, int, Tensor, str, Any]:
        path, label = self.samples[i]
        targets = self.replay.targets(self.epoch, i) if self.replay is not None else None
        try:
            pixels, params = self._read_device(path, i) if self.decode_on_device else self._read_pil(path, i)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            return torch.zeros(0, dtype=torch.uint8), label, i, torch.tensor(NO_CROP), \
                f"cannot decode image {path}: {exc}", targets
        return pixels, label, i, torch.tensor(params), "", targets

    def _read_pil(self, path: Path, i: int) -> tuple[Tensor, tuple[int, ...]]:
        with Image.open(path) as img:
            img = img.convert("RGB")
        if self.pipeline.crop is None:
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.pipeline.transform(img), NO_CROP  # type: ignore[misc]
        params = self.crop_params(i, *img.size)
        return self.normalise(crop_pil(img, params, self.pipeline.crop)), params

    def _read_device(self, path: Path, i: int) -> tuple[Tensor, tuple[int, ...]]:
        """JPEG: the file's bytes (decoded on the device later); other files and CMYK JPEGs: RGB uint8 pixels."""
        data = path.read_bytes()
        if data[:3] == JPEG_MAGIC and not jpeg_is_complete(data):
            # PIL reports this when decoding, but nvJPEG and DALI fill the missing rows with grey.
            raise ValueError("the JPEG data ends before its end-of-image marker (truncated file)")
        with Image.open(path) as img:  # reads the header only
            size, mode = img.size, img.mode
            if data[:3] != JPEG_MAGIC or mode not in DEVICE_DECODABLE_MODES:
                payload = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
            else:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        params = self.crop_params(i, *size) if self.pipeline.crop is not None else NO_CROP
        return payload, params


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's last start-of-scan marker (FFDA) is followed by an end-of-image marker (FFD9). Inside
    entropy-coded data an FF byte is always followed by 00 or a restart marker (ITU-T T.81, B.1.1.5), so neither
    marker can appear there; an embedded EXIF thumbnail's markers come before the main image's scans."""
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def collate_folder(items: list[tuple]) -> tuple[Any, ...]:
    pixels, labels, index, crops, errors, targets = zip(*items)
    if targets[0] is not None:
        targets = (torch.from_numpy(np.stack([t[0] for t in targets])),
                   torch.from_numpy(np.stack([t[1] for t in targets])),
                   torch.tensor([t[2] for t in targets], dtype=torch.float32))
    else:
        targets = None
    return list(pixels), torch.tensor(labels), torch.tensor(index), torch.stack(crops), list(errors), targets


def decode_on(device: torch.device, payloads: Sequence[Tensor]) -> list[Tensor]:
    """Decode a batch's JPEG byte tensors in one call on ``device`` (already-decoded [3, H, W] pixels pass
    through)."""
    jpeg = [i for i, p in enumerate(payloads) if p.dim() == 1]
    out = [p.to(device) if p.dim() == 3 else None for p in payloads]
    if jpeg:
        with warnings.catch_warnings():
            # torchvision 0.29 announces its decoders' move to TorchCodec; they are the pinned release's decoders.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision are deprecated")
            decoded = decode_jpeg([payloads[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg, decoded):
            out[i] = img
    return out  # type: ignore[return-value]


class DeviceAugment(Protocol):
    """Decodes and augments a batch of worker payloads (JPEG bytes, or RGB pixels for other files) on the run's
    device: ``(payloads, crop parameters, error messages, file names) -> (normalised images of the samples
    without an error, in order; error messages with the undecodable ones added)``."""

    def __call__(self, payloads: list[Tensor], crops: Tensor, errors: list[str],
                 names: list[str]) -> tuple[Tensor, list[str]]: ...


class TorchDeviceAugment:
    """``data.loader=device``: torchvision's batched ``decode_jpeg`` on ``device``, then the explicit crops (or the
    evaluation resize + centre crop) as tensor ops and the normalisation."""

    def __init__(self, pipeline: FolderPipeline, device: torch.device):
        self.pipeline, self.device = pipeline, torch.device(device)
        self.mean = torch.tensor(pipeline.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(pipeline.std, device=self.device).view(1, -1, 1, 1)

    def __call__(self, payloads: list[Tensor], crops: Tensor, errors: list[str],
                 names: list[str]) -> tuple[Tensor, list[str]]:
        images, errors = self.decode(payloads, errors, names)
        keep = [i for i, e in enumerate(errors) if not e]
        if not keep:
            return torch.empty((0, 3, self.pipeline.size, self.pipeline.size), device=self.device), errors
        return self.augment([images[i] for i in keep], crops[keep]), errors

    def decode(self, payloads: list[Tensor], errors: list[str], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """One decoder call for the batch; when it fails, image by image, so only the bad files are reported."""
        readable = [i for i, e in enumerate(errors) if not e]
        images: list[Tensor] = list(payloads)
        errors = list(errors)
        try:
            for i, img in zip(readable, decode_on(self.device, [payloads[i] for i in readable])):
                images[i] = img
        except RuntimeError:
            for i in readable:
                try:
                    images[i] = decode_on(self.device, [payloads[i]])[0]
                except RuntimeError as exc:
                    errors[i] = f"cannot decode image {names[i]}: {exc}"
        return images, errors

    def augment(self, images: list[Tensor], crops: Tensor) -> Tensor:
        pipeline = self.pipeline
        if pipeline.crop is not None:
            pixels = crop_tensors(images, crops, pipeline.crop)
        else:
            pixels = resize_centre_crop_tensors(images, int(pipeline.resize or pipeline.size), pipeline.size,
                                                pipeline.interpolation)
        return (pixels.float().div_(255) - self.mean) / self.std


class FolderLoader:
    """Same interface as :class:`TensorBatchLoader`: ``len()`` and ``iterate(epoch, start_step)``. With a
    ``device_augment`` the workers hand over file bytes and that strategy decodes and augments each batch."""

    def __init__(self, samples: list[tuple[Path, int]], pipeline: FolderPipeline, *, batch_size: int,
                 num_workers: int, device: torch.device, shuffle: bool, seed: int, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, device_augment: DeviceAugment | None = None,
                 corrupt: str = "stop", num_classes: int | None = None):
        self.dataset = FolderDataset(samples, pipeline, seed, decode_on_device=device_augment is not None)
        self.pipeline = pipeline
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, torch.device(device)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device_augment, self.corrupt = device_augment, corrupt
        self.num_classes = num_classes
        self.skipped = 0

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return self.dataset.samples

    def in_index_order(self, batch_size: int | None = None) -> FolderLoader:
        """The same samples and augmentation, every sample once in index order in one process (building and
        checking a crop-level cache)."""
        ordered = FolderLoader(self.samples, self.pipeline, batch_size=batch_size or self.batch_size,
                               num_workers=self.num_workers, device=self.device, shuffle=False, seed=self.seed,
                               device_augment=self.device_augment, corrupt=self.corrupt,
                               num_classes=self.num_classes)
        ordered.dataset.replay = self.dataset.replay
        return ordered

    def replay(self, cache: CropCache) -> None:
        """Train on the cache's crops and targets (the crop-level teacher cache) instead of drawing crops."""
        if self.pipeline.crop is None:
            raise UserInputError("the crop-level teacher cache needs the RandomResizedCrop pipeline "
                                 "(data.augment=true)")
        self.dataset.replay = cache

    def _order(self, epoch: int) -> Tensor:
        return rank_share(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          shuffle=self.shuffle)

    def __len__(self) -> int:
        return batches_per_rank(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def epoch_stats(self) -> dict[str, float]:
        """What the epoch record reports of this loader (images skipped as undecodable, ``data.corrupt=skip``)."""
        return {"data/skipped_images": float(self.skipped)}

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.dataset.epoch = epoch
        self.skipped = 0
        order = self._order(epoch)[start_step * self.batch_size : len(self) * self.batch_size].tolist()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                            collate_fn=collate_folder, pin_memory=self.device.type == "cuda",
                            drop_last=self.drop_last, prefetch_factor=4 if self.num_workers else None)
        for collated in loader:
            batch = self.to_batch(*collated)
            if batch is not None:
                yield batch

    def to_batch(self, pixels: list[Tensor], labels: Tensor, index: Tensor, crops: Tensor, errors: list[str],
                 targets: tuple[Tensor, Tensor, Tensor] | None) -> Batch | None:
        """The collated worker output -> a device Batch: undecodable images stop the run or are dropped
        (``data.corrupt``), the device backends decode and augment here, cached targets become logits."""
        device = self.device
        image: Tensor | None = None
        if self.device_augment is not None:
            names = [str(self.dataset.samples[i][0]) for i in index.tolist()]
            image, errors = self.device_augment(pixels, crops, errors, names)
        bad = [i for i, e in enumerate(errors) if e]
        if bad and self.corrupt == "stop":
            raise UserInputError(f"{errors[bad[0]]} (data.corrupt=skip drops such images with a warning)")
        keep = [i for i in range(len(errors)) if not errors[i]]
        if bad:
            for i in bad:
                warnings.warn(f"skipped: {errors[i]}", stacklevel=2)
            self.skipped += len(bad)
            if not keep:
                return None
            labels, index, crops = labels[keep], index[keep], crops[keep]
            targets = None if targets is None else tuple(t[keep] for t in targets)  # type: ignore[assignment]
        if image is None:
            image = torch.stack([pixels[i] for i in keep]).to(device, non_blocking=True)
        teacher_logits = None
        if targets is not None:
            values, classes, tail = (t.to(device, non_blocking=True) for t in targets)
            teacher_logits = reconstruct_logits(values, classes, tail, int(self.num_classes or 0))
        return Batch(image, labels.to(device, non_blocking=True), index.to(device, non_blocking=True),
                     crop=crops.to(device, non_blocking=True), teacher_logits=teacher_logits)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(epoch=1)


def imagenet_pipelines(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                       interpolation: str = "bilinear") -> tuple[FolderPipeline, FolderPipeline]:
    """mdistiller/torchdistill ImageNet recipe: RandomResizedCrop + flip; test Resize(256) + CenterCrop(224)
    (both sizes scaled together for another ``size``)."""
    mode = T.InterpolationMode.BILINEAR if interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    resize = int(size * 256 / 224)
    test_tf = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                         T.Normalize(mean, std)])
    spec = ResizedCropSpec(size, (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1])), interpolation)
    train = FolderPipeline(tuple(mean), tuple(std), size, crop=spec, interpolation=interpolation)
    test = FolderPipeline(tuple(mean), tuple(std), size, transform=test_tf, resize=resize, interpolation=interpolation)
    return train, test


def tiny_imagenet_pipelines(mean: Sequence[float] = TINY_IMAGENET_MEAN,
                            std: Sequence[float] = TINY_IMAGENET_STD) -> tuple[FolderPipeline, FolderPipeline]:
    """mdistiller Tiny-ImageNet recipe (docs/config.md): RandomRotation(20) + flip at 64x64."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomRotation(20), T.RandomHorizontalFlip(), *norm])
    return (FolderPipeline(tuple(mean), tuple(std), 64, transform=train_tf),
            FolderPipeline(tuple(mean), tuple(std), 64, transform=T.Compose(norm)))

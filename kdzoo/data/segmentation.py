"""Semantic-segmentation datasets (Pascal VOC 2012 [+ SBD], Cityscapes, a generic folder, the nuclei demo)
and their loaders, with exact resume.

Reference: clovaai/overhaul-distillation ``Segmentation/dataloaders/`` (``__init__.py``, ``datasets/pascal.py``,
``datasets/cityscapes.py``, ``custom_transforms.py``), itself pytorch-deeplab-xception's loaders
(jfzhang95/pytorch-deeplab-xception ``dataloaders/datasets/sbd.py``, ``combine_dbs.py``).

Worker processes decode and apply the geometric augmentation (:mod:`kdzoo.data.seg_transforms`) and hand
over uint8 images and int64 masks; the batch is normalised on the training device after the transfer (a
quarter of the bytes of float images, the same numbers up to float rounding). A sample's augmentation
comes from a ``random.Random`` seeded by (seed, epoch, index) and the epoch's order from a generator seeded
by (seed, epoch), so ``iterate(epoch, start_step)`` reproduces an interrupted epoch's remaining batches.

Every mask of both splits is read once while the data is built, so a wrong file fails the run before the
first step; nothing is cached.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from kdzoo.data import nuclei
from kdzoo.data.bundle import DataBundle
from kdzoo.data.planned_loader import PlannedBatchLoader, batches_per_rank, rank_share, sample_seed
from kdzoo.data.seg_transforms import FixedResize, FixScaleCrop, TrainTransform, mask_image
from kdzoo.errors import UserInputError
from kdzoo.types import Batch, DatasetInfo

SEGMENTATION_DATASETS = ("voc", "cityscapes", "segfolder", "nuclei")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the reference's Normalize
VOC_NUM_CLASSES, CITYSCAPES_NUM_CLASSES = 21, 19
VOC_LAYOUT = ("<root>/VOCdevkit/VOC2012 or <root> holding JPEGImages/<id>.jpg, SegmentationClass/<id>.png "
              "and ImageSets/Segmentation/<split>.txt")
SBD_LAYOUT = "<sbd_root>/dataset or <sbd_root> holding img/<id>.jpg, cls/<id>.mat and train.txt, val.txt"
CITYSCAPES_LAYOUT = ("<root> holding leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                     "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or gtFine_trainvaltest/gtFine/...)")
SEGFOLDER_LAYOUT = "<root>/images/<split>/<name>.{jpg,jpeg,png} with <root>/masks/<split>/<name>.png"
# Cityscapes labelIds -> trainIds (cityscapesScripts ``helpers/labels.py``; the reference's encode_segmap):
# these 19 ids become classes 0..18, every other id is void.
CITYSCAPES_VALID_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MASK_MODES = ("P", "L", "1", "I;16", "I")
_MAX_LISTED = 10


@dataclass(frozen=True)
class SegSample:
    """One image and its mask. ``mask_kind``: ``png`` (class-index PNG), ``sbd`` (SBD ``.mat``,
    ``GTcls.Segmentation``) or ``cityscapes_ids`` (Cityscapes labelIds PNG, mapped to trainIds)."""

    id: str
    image: Path
    mask: Path
    mask_kind: str = "png"


# ----------------------------------------------------------------------------------------------- reading


def decode_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserInputError(f"cannot decode image {path}: {exc}") from None


def read_mask(sample: SegSample, ignore_index: int = 255) -> np.ndarray:
    """The class-index array of a sample's mask (any integer dtype)."""
    path = sample.mask
    try:
        if sample.mask_kind == "sbd":
            return np.asarray(scipy.io.loadmat(str(path))["GTcls"]["Segmentation"][0, 0])
        with Image.open(path) as img:
            if img.mode not in _MASK_MODES:
                raise UserInputError(
                    f"{path}: the mask is a {img.mode} image, but masks must hold class indices: a palette ('P', "
                    "as VOC's SegmentationClass PNGs) or greyscale ('L') PNG whose pixel values are the classes. "
                    "Colour-coded masks have to be converted to class indices first.")
            mask = np.array(img)
    except UserInputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, KeyError, IndexError) as exc:
        raise UserInputError(f"cannot read mask {path}: {exc}") from None
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if sample.mask_kind == "cityscapes_ids":
        lut = np.full(256, ignore_index, dtype=np.int64)
        lut[list(CITYSCAPES_VALID_IDS)] = np.arange(len(CITYSCAPES_VALID_IDS))
        mask = lut[mask.astype(np.uint8)]
    return mask


def _probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image, after checking that it decodes. JPEGs are decoded at 1/8 scale (libjpeg's
    DCT scaling still reads the whole entropy-coded stream, so a truncated file fails, at a fraction of a full
    decode); other formats are checked with PIL's ``verify`` (chunk CRCs for PNG)."""
    try:
        with Image.open(path) as img:
            size = img.size
            if img.format == "JPEG":
                img.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
            else:
                img.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UserInputError(f"cannot decode image {path}: {exc}") from None
    return size


def check_samples(samples: Sequence[SegSample], num_classes: int, ignore_index: int,
                  what: str) -> list[tuple[int, int]]:
    """Read every image header and every mask once; raise one :class:`UserInputError` listing the problems
    (missing files, undecodable images, RGB masks, size mismatches, out-of-range classes). Returns each
    sample's (width, height)."""
    problems: list[str] = []
    sizes: list[tuple[int, int]] = []
    for s in samples:
        missing = [str(p) for p in (s.image, s.mask) if not p.is_file()]
        if missing:
            problems.append(f"{s.id}: missing {' and '.join(missing)}")
            sizes.append((0, 0))
            continue
        try:
            size = _probe_image(s.image)
            mask = read_mask(s, ignore_index)
        except UserInputError as exc:
            problems.append(str(exc))
            sizes.append((0, 0))
            continue
        sizes.append(size)
        if mask.shape != (size[1], size[0]):
            problems.append(f"{s.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {s.image} is "
                            f"{size[0]}x{size[1]} (width x height)")
            continue
        # For uint8 masks a 256-bin histogram is several times cheaper than np.unique.
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 \
            else np.unique(mask)
        bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
        if bad:
            problems.append(f"{s.mask}: mask values {bad} are neither classes 0..{num_classes - 1} nor the "
                            f"ignore index {ignore_index}")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise UserInputError(f"{len(problems)} problem(s) in the {what} data:\n  "
                             + "\n  ".join(problems[:_MAX_LISTED]) + more)
    return sizes


# ------------------------------------------------------------------------------------------------ layouts


def _read_split_file(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise UserInputError(f"split file {path} does not exist (expected {layout})")
    return list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))


def find_voc_root(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise UserInputError(f"no Pascal VOC 2012 data at {root} (expected {VOC_LAYOUT})")


def voc_samples(voc_root: Path, split: str) -> list[SegSample]:
    ids = _read_split_file(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt", VOC_LAYOUT)
    return [SegSample(i, voc_root / "JPEGImages" / f"{i}.jpg", voc_root / "SegmentationClass" / f"{i}.png")
            for i in ids]


def sbd_samples(sbd_root: str | Path, splits: Sequence[str] = ("train", "val")) -> list[SegSample]:
    root = Path(sbd_root)
    base = root / "dataset" if (root / "dataset").is_dir() else root
    if not (base / "cls").is_dir():
        raise UserInputError(f"no SBD data at {root} (expected {SBD_LAYOUT})")
    ids = list(dict.fromkeys(i for split in sorted(splits) for i in _read_split_file(base / f"{split}.txt",
                                                                                      SBD_LAYOUT)))
    return [SegSample(i, base / "img" / f"{i}.jpg", base / "cls" / f"{i}.mat", "sbd") for i in ids]


def merge_sbd(voc_train: Sequence[SegSample], sbd: Sequence[SegSample],
              excluded_ids: set[str]) -> list[SegSample]:
    """pytorch-deeplab-xception's CombineDBs([VOC train, SBD train+val], excluded=[VOC val]): every id once
    (VOC's files where both have it), minus every id of the VOC validation split."""
    merged: dict[str, SegSample] = {}
    for s in [*voc_train, *sbd]:
        if s.id not in excluded_ids and s.id not in merged:
            merged[s.id] = s
    return list(merged.values())


def find_cityscapes_root(root: str | Path) -> tuple[Path, Path]:
    """(leftImg8bit dir, gtFine dir), accepting the plain and the ``gtFine_trainvaltest`` download layouts."""
    root = Path(root)
    for base in (root, root / "cityscapes"):
        images = base / "leftImg8bit"
        for gt in (base / "gtFine", base / "gtFine_trainvaltest" / "gtFine"):
            if images.is_dir() and gt.is_dir():
                return images, gt
    raise UserInputError(f"no Cityscapes data at {root} (expected {CITYSCAPES_LAYOUT})")


def cityscapes_samples(images_dir: Path, gt_dir: Path, split: str) -> list[SegSample]:
    split_dir = images_dir / split
    if not split_dir.is_dir():
        raise UserInputError(f"Cityscapes split folder {split_dir} does not exist (expected {CITYSCAPES_LAYOUT})")
    samples = []
    for img in sorted(split_dir.glob("*/*_leftImg8bit.png")):
        city, stem = img.parent.name, img.name[: -len("_leftImg8bit.png")]
        train_ids = gt_dir / split / city / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = gt_dir / split / city / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file() or not label_ids.is_file():  # a missing mask is reported under the trainIds name
            samples.append(SegSample(f"{city}/{stem}", img, train_ids))
        else:  # raw download without cityscapesScripts' createTrainIdLabelImgs: map the ids as the reference
            samples.append(SegSample(f"{city}/{stem}", img, label_ids, "cityscapes_ids"))
    if not samples:
        raise UserInputError(f"no *_leftImg8bit.png images under {split_dir}/<city>/ (expected {CITYSCAPES_LAYOUT})")
    return samples


def segfolder_samples(root: str | Path, split: str) -> list[SegSample]:
    image_dir, mask_dir = Path(root) / "images" / split, Path(root) / "masks" / split
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise UserInputError(f"segmentation folder {d} does not exist (expected {SEGFOLDER_LAYOUT})")
    by_stem: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in _IMAGE_SUFFIXES:
            if p.stem in by_stem:
                raise UserInputError(f"{by_stem[p.stem]} and {p} share the name {p.stem!r}: one mask cannot "
                                     "belong to both")
            by_stem[p.stem] = p
    if not by_stem:
        raise UserInputError(f"{image_dir} holds no images ({', '.join(_IMAGE_SUFFIXES)}); expected "
                             f"{SEGFOLDER_LAYOUT}")
    return [SegSample(stem, path, mask_dir / f"{stem}.png") for stem, path in sorted(by_stem.items())]


# ------------------------------------------------------------------------------------------------ loaders


class SeededSegmentationDataset(Dataset):
    """Decodes sample ``i`` and applies ``transform`` with ``random.Random(sample_seed(seed, epoch, i))``."""

    def __init__(self, samples: Sequence[SegSample], transform: Callable, seed: int, ignore_index: int = 255):
        self.samples = list(samples)
        self.transform, self.seed, self.ignore_index = transform, seed, ignore_index
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = self.samples[i]
        img, mask = decode_image(s.image), read_mask(s, self.ignore_index)
        if mask.shape != (img.height, img.width):
            raise UserInputError(f"{s.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {s.image} is "
                                 f"{img.width}x{img.height}")
        img, mask_img = self.transform(img, mask_image(mask, self.ignore_index),
                                       random.Random(sample_seed(self.seed, self.epoch, i)))
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        # uint8 when every label fits (VOC, Cityscapes: classes < 255, ignore 255): 8x less to pin and transfer;
        # the loader widens to int64 on the device.
        mask_dtype = np.uint8 if self.ignore_index <= 255 else np.int64
        return image, torch.from_numpy(np.asarray(mask_img, dtype=mask_dtype).copy()), i


class _SegLoader(PlannedBatchLoader):
    def __init__(self, dataset: SeededSegmentationDataset, *, batch_size: int, num_workers: int,
                 device: torch.device, mean: Sequence[float], std: Sequence[float]):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, device=device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def to_batch(self, collated: Any) -> Batch:
        images, masks, index = collated
        # ToTensor's /255 then Normalize, batched on the device (the reference does it per sample on the CPU)
        x = images.to(self.device, non_blocking=True).float().div_(255.0).sub_(self.mean).div_(self.std)
        target = masks.to(self.device, non_blocking=True).long()
        return Batch(x, target, index.to(self.device, non_blocking=True))


class SegTrainLoader(_SegLoader):
    """Shuffled fixed-size batches of square crops; DDP ranks take every ``world_size``-th sample of the
    epoch's permutation, padded by repetition to an equal count (as :class:`kdzoo.data.folder.FolderLoader`)."""

    def __init__(self, dataset: SeededSegmentationDataset, *, seed: int, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size

    def __len__(self) -> int:
        return batches_per_rank(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def batches(self, epoch: int) -> list[list[int]]:
        order = rank_share(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size).tolist()
        return [order[i: i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]


class SegValLoader(_SegLoader):
    """Whole images in split order. Rank r evaluates samples r, r + world_size, ... (no duplicates: the
    evaluator sums confusion matrices over ranks); consecutive images of equal resized size share a batch of
    up to ``batch_size``, any other image is a batch of its own (the reference evaluates with batch size 1)."""

    def __init__(self, dataset: SeededSegmentationDataset, output_sizes: Sequence[tuple[int, int]], *,
                 rank: int = 0, world_size: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        mine = list(range(rank, len(dataset), world_size))
        self._batches: list[list[int]] = []
        for i in mine:
            last = self._batches[-1] if self._batches else None
            if last and len(last) < self.batch_size and output_sizes[last[-1]] == output_sizes[i]:
                last.append(i)
            else:
                self._batches.append([i])

    def batches(self, epoch: int) -> list[list[int]]:
        return [list(b) for b in self._batches]


# ----------------------------------------------------------------------------------------------- building


def _positive(cfg: Any, name: str, default: int) -> int:
    value = getattr(cfg, name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"data.{name} must be a positive integer, got {value!r}")
    return value


def _dataset_samples(cfg: Any, name: str, train_split: str, val_split: str
                     ) -> tuple[list[SegSample], list[SegSample], int]:
    sbd_root = getattr(cfg, "sbd_root", None)
    if sbd_root is not None and name != "voc":
        raise UserInputError(f"data.sbd_root adds SBD to Pascal VOC; it does not apply to dataset {name!r}")
    fixed = {"voc": VOC_NUM_CLASSES, "nuclei": nuclei.NUCLEI_NUM_CLASSES, "cityscapes": CITYSCAPES_NUM_CLASSES}
    requested = getattr(cfg, "num_classes", None)
    if name in fixed:
        if requested is not None and requested != fixed[name]:
            raise UserInputError(f"data.num_classes is {requested}, but {name} has {fixed[name]} classes")
        num_classes = fixed[name]
    else:
        if requested is None:
            raise UserInputError("dataset segfolder needs data.num_classes (the number of classes its masks use)")
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
            raise UserInputError(f"data.num_classes must be an integer >= 2, got {requested!r}")
        num_classes = requested
    if name in ("voc", "nuclei"):
        voc_root = nuclei.prepare_nuclei_voc(cfg.root) if name == "nuclei" else find_voc_root(cfg.root)
        train, val = voc_samples(voc_root, train_split), voc_samples(voc_root, val_split)
        if sbd_root is not None:
            train = merge_sbd(train, sbd_samples(sbd_root), {s.id for s in val})
    elif name == "cityscapes":
        images_dir, gt_dir = find_cityscapes_root(cfg.root)
        train, val = cityscapes_samples(images_dir, gt_dir, train_split), cityscapes_samples(images_dir, gt_dir,
                                                                                             val_split)
    else:
        train, val = segfolder_samples(cfg.root, train_split), segfolder_samples(cfg.root, val_split)
    return sorted(train, key=lambda s: s.id), sorted(val, key=lambda s: s.id), num_classes


def build_segmentation_data(cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                            drop_last: bool = False) -> DataBundle:
    """Loaders for ``cfg.dataset`` in :data:`SEGMENTATION_DATASETS`. ``cfg``: a DataConfig (the segmentation
    keys are read with defaults: crop_size 513, base_size 513, ignore_index 255, sbd_root, train_split
    "train", val_split "val", num_classes)."""
    name = cfg.dataset
    if name not in SEGMENTATION_DATASETS:
        raise UserInputError(f"unknown segmentation dataset {name!r}; available: {', '.join(SEGMENTATION_DATASETS)}")
    crop, base = _positive(cfg, "crop_size", 513), _positive(cfg, "base_size", 513)
    ignore_index = getattr(cfg, "ignore_index", 255)
    if not isinstance(ignore_index, int) or ignore_index < 0:
        raise UserInputError(f"data.ignore_index must be a non-negative integer, got {ignore_index!r}")
    train_split, val_split = getattr(cfg, "train_split", "train"), getattr(cfg, "val_split", "val")
    mean, std = tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise UserInputError(f"data.mean/data.std need 3 values (RGB images), got {len(mean)} and {len(std)}")
    train, val, num_classes = _dataset_samples(cfg, name, train_split, val_split)
    if ignore_index < num_classes:
        raise UserInputError(f"data.ignore_index {ignore_index} is one of the {num_classes} classes of {name}")
    if cfg.subset is not None:
        train = train[: cfg.subset]
    if cfg.test_subset is not None:
        val = val[: cfg.test_subset]
    for split, samples in ((train_split, train), (val_split, val)):
        if not samples:
            raise UserInputError(f"the {name} {split} split is empty")
    check_samples(train, num_classes, ignore_index, f"{name} {train_split}")
    val_sizes = check_samples(val, num_classes, ignore_index, f"{name} {val_split}")
    val_tf = FixedResize(crop)
    train_tf = TrainTransform(base, crop, ignore_index) if cfg.augment else FixScaleCrop(crop)
    common = {"num_workers": cfg.num_workers, "device": device, "mean": mean, "std": std}
    train_loader = SegTrainLoader(SeededSegmentationDataset(train, train_tf, seed, ignore_index), seed=seed,
                                  batch_size=cfg.batch_size, drop_last=drop_last or cfg.drop_last, rank=rank,
                                  world_size=world_size, **common)
    test_loader = SegValLoader(SeededSegmentationDataset(val, val_tf, seed, ignore_index),
                               [val_tf.output_size(*s) for s in val_sizes], batch_size=cfg.test_batch_size,
                               rank=rank, world_size=world_size, **common)
    info = DatasetInfo(num_samples=len(train), num_classes=num_classes, targets=torch.zeros(0, dtype=torch.long))
    return DataBundle(train_loader, test_loader, info, (3, crop, crop), num_classes, test_sharded=True)

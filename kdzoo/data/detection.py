"""Object-detection datasets (COCO json, Pascal VOC xml, the trees demo) and their loaders, with exact resume.

Targets follow torchvision's detection convention (pytorch/vision ``references/detection/coco_utils.py``,
``ConvertCocoPolysToMask``; the ``torchvision.models.detection`` docs): per image a dict with ``boxes`` float32
``[N, 4]`` xyxy in absolute pixels and ``labels`` int64 ``[N]`` in ``1..K``, 0 being the background. A batch
is a list of float ``[3, H, W]`` images in [0, 1] at their own sizes and a list of such dicts: the detector
resizes and normalises inside the model (``GeneralizedRCNNTransform``).

- COCO: ``instances_<split>.json`` is read with ``json``; category ids map to labels 1..K in sorted id order
  (``label_to_category`` maps back for evaluation). Crowd boxes are left out of the training targets and
  images without annotations are dropped from training unless ``data.keep_empty`` (both as the torchvision
  reference: ``ConvertCocoPolysToMask`` and ``_coco_remove_images_without_annotations``).
- Pascal VOC xml: the 20 VOC classes (or ``data.class_names``); ``difficult`` boxes are left out of the
  training targets (py-faster-rcnn ``lib/datasets/pascal_voc.py``, ``use_diff=False``) and kept for the
  evaluation as crowd regions. VOC's 1-based inclusive pixel indices become continuous coordinates
  ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2 ``detectron2/data/datasets/pascal_voc.py``).

Every annotation and every image header of both splits is checked before training (boxes, categories,
sizes, decodability) and the problems are raised together as one :class:`UserInputError`.

Exact resume: a sample's flip is drawn from ``random.Random`` seeded by (seed, epoch, index) and the epoch's
order from a generator seeded by (seed, epoch); the aspect-ratio grouped batches are a pure function of that
order (:func:`kdzoo.data.det_transforms.grouped_batches`), so ``iterate(epoch, start_step)`` replays an
interrupted epoch's remaining batches.
"""

from __future__ import annotations

import json
import os
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdzoo.data import trees
from kdzoo.data.bundle import DataBundle
from kdzoo.data.det_transforms import aspect_ratio_groups, grouped_batches, random_hflip
from kdzoo.data.planned_loader import PlannedBatchLoader, batches_per_rank, rank_share, sample_seed
from kdzoo.data.segmentation import _probe_image, decode_image
from kdzoo.errors import UserInputError
from kdzoo.types import Batch, DatasetInfo

DETECTION_DATASETS = ("coco", "vocdet", "trees")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
COCO_LAYOUT = ("<root>/annotations/instances_<split>.json with the images in <root>/<split>/ (or "
               "<root>/images/<split>/), e.g. <root>/annotations/instances_val2017.json and <root>/val2017/")
VOCDET_LAYOUT = ("<root>/VOCdevkit/VOC2012, <root>/VOCdevkit/VOC2007 or <root> holding Annotations/<id>.xml, "
                 "JPEGImages/<id>.jpg and ImageSets/Main/<split>.txt")
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (then clamped, as ConvertCocoPolysToMask)
MIN_SIZE = 800  # torchvision's detectors' default min_size (GeneralizedRCNNTransform)
_MAX_LISTED = 10


@dataclass(eq=False)
class DetSample:
    """One image: its training target and its evaluation ground truth.

    ``boxes`` float32 [N, 4] xyxy clamped to the image, crowd / difficult boxes and degenerate ones removed;
    ``labels`` int64 [N] in 1..K. ``gt``: COCO-style annotation dicts of every box of the image (COCO: the
    file's own values; VOC: converted, difficult as ``iscrowd=1``). ``annotated``: the image passes the
    torchvision reference's "has a valid annotation" test (some box, not all of them <= 1 px wide or high)."""

    id: str
    image: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    gt: list[dict] = field(default_factory=list)
    annotated: bool = False


class _Problems(list):
    def raise_if_any(self, what: str) -> None:
        if self:
            more = f"\n  ... and {len(self) - _MAX_LISTED} more" if len(self) > _MAX_LISTED else ""
            raise UserInputError(f"{len(self)} problem(s) in the {what} data:\n  " + "\n  ".join(self[:_MAX_LISTED])
                                 + more)


# ----------------------------------------------------------------------------------------------- boxes


def box_problem(x0: float, y0: float, x1: float, y1: float, width: int, height: int,
                allow_empty: bool = False) -> str | None:
    """Why an xyxy box cannot be a box of a ``width`` x ``height`` image, or None. Zero width or height is
    allowed with ``allow_empty`` (COCO's own train2017 holds two such boxes, cocodataset/cocoapi#355;
    ``ConvertCocoPolysToMask`` drops them)."""
    if not all(np.isfinite([x0, y0, x1, y1])):
        return "is not finite"
    w, h = x1 - x0, y1 - y0
    if w < 0 or h < 0 or (not allow_empty and (w == 0 or h == 0)):
        return f"has a non-positive width or height ({w:g} x {h:g})"
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return f"lies outside the {width}x{height} image (by more than {tol:g} px)"
    return None


def training_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes clamped to the image (``ConvertCocoPolysToMask``); the caller drops those left without area."""
    out = boxes.astype(np.float64, copy=True).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def _sample(sid: str, image: Path, image_id: int, width: int, height: int, xyxy: list[list[float]],
            labels: list[int], ignore: list[bool], gt: list[dict]) -> DetSample:
    boxes = training_boxes(np.array(xyxy, dtype=np.float64), width, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & ~np.array(ignore, dtype=bool).reshape(-1)
    # _has_only_empty_bbox: an image whose every box is <= 1 px in width or height counts as unannotated.
    annotated = bool(gt) and not all(a["bbox"][2] <= 1 or a["bbox"][3] <= 1 for a in gt)
    return DetSample(sid, image, image_id, width, height, boxes[keep].astype(np.float32),
                     np.array(labels, dtype=np.int64).reshape(-1)[keep], gt, annotated)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------- COCO


def find_coco_annotations(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a COCO split; ``train`` / ``val`` also find the 2017 files."""
    for name in dict.fromkeys((split, f"{split}2017")):
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            for images in (root / name, root / "images" / name):
                if images.is_dir():
                    return ann, images
            raise UserInputError(f"{ann} exists but its image folder {root / name} does not (expected {COCO_LAYOUT})")
    raise UserInputError(f"no COCO annotation file {root / 'annotations' / f'instances_{split}.json'} "
                         f"(expected {COCO_LAYOUT})")


def read_coco_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read COCO annotation file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise UserInputError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and "
                             "'categories' lists")
    if not isinstance(data.get("annotations", []), list):
        raise UserInputError(f"{path}: 'annotations' must be a list")
    return data


def coco_category_mapping(categories: Sequence[dict], path: Path) -> tuple[dict[int, int], list[dict]]:
    """(category id -> label 1..K in sorted id order, the categories as ``{id, name}`` sorted by id)."""
    cats: dict[int, str] = {}
    for c in categories:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid in cats:
            raise UserInputError(f"{path}: category {c!r} needs a unique integer 'id'")
        cats[cid] = str(c.get("name", cid))
    if not cats:
        raise UserInputError(f"{path} lists no categories")
    ordered = sorted(cats)
    return {cid: k + 1 for k, cid in enumerate(ordered)}, [{"id": cid, "name": cats[cid]} for cid in ordered]


def coco_samples(data: dict, ann_path: Path, image_dir: Path, cat_to_label: dict[int, int],
                 problems: list[str]) -> list[DetSample]:
    """The images of a COCO instances file (sorted by id) with their targets; problems are appended."""
    by_image: dict[int, list[dict]] = {}
    images: dict[int, dict] = {}
    for img in data["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        ok = (isinstance(iid, int) and isinstance(img.get("file_name"), str)
              and all(isinstance(img.get(k), int) and img[k] > 0 for k in ("width", "height")))
        if not ok or iid in images:
            problems.append(f"{ann_path}: image entry {img!r} needs a unique integer 'id', a 'file_name' and "
                            "positive integer 'width' and 'height'")
            continue
        images[iid] = img
        by_image[iid] = []
    for ann in data.get("annotations", []):
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if iid not in by_image:
            problems.append(f"{ann_path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} refers "
                            f"to image id {iid!r}, which the images list lacks")
            continue
        by_image[iid].append(ann)
    samples = []
    for iid in sorted(images):
        img = images[iid]
        width, height, name = img["width"], img["height"], img["file_name"]
        xyxy, labels, crowd, gt = [], [], [], []
        for ann in by_image[iid]:
            where = f"{ann_path}: annotation {ann.get('id')!r} of {name}"
            bbox, cid = ann.get("bbox"), ann.get("category_id")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                problems.append(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
                continue
            if cid not in cat_to_label:
                problems.append(f"{where}: category_id {cid!r} is not in the categories list "
                                f"(ids {min(cat_to_label)}..{max(cat_to_label)})")
                continue
            if not isinstance(ann.get("id"), int) or ann["id"] <= 0:  # COCOeval matches by id; 0 means "none"
                problems.append(f"{where}: annotations need a positive integer 'id'")
                continue
            x, y, w, h = (float(v) for v in bbox)
            why = box_problem(x, y, x + w, y + h, width, height, allow_empty=True)
            if why:
                problems.append(f"{where}: box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] {why}")
                continue
            is_crowd = bool(ann.get("iscrowd", 0))
            xyxy.append([x, y, x + w, y + h])
            labels.append(cat_to_label[cid])
            crowd.append(is_crowd)
            area = ann.get("area")
            gt.append({"id": ann["id"], "image_id": iid, "category_id": cid, "bbox": list(bbox),
                       "area": float(area) if _is_number(area) else w * h, "iscrowd": int(is_crowd)})
        samples.append(_sample(name, image_dir / name, iid, width, height, xyxy, labels, crowd, gt))
    return samples


# ----------------------------------------------------------------------------------------------- VOC xml


def find_vocdet_root(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOCdevkit" / "VOC2007", root):
        if (candidate / "Annotations").is_dir():
            return candidate
    raise UserInputError(f"no Pascal VOC detection data at {root} (expected {VOCDET_LAYOUT})")


def _xml_number(node: ET.Element | None, tag: str) -> float:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        raise ValueError(f"no <{tag}>")
    return float(child.text.strip())


def parse_voc_xml(path: Path, class_to_label: dict[str, int]) -> tuple[tuple[int, int] | None, list[tuple]]:
    """((width, height) as recorded or None, [(label, xyxy continuous, difficult), ...]). A malformed file or
    an unknown class name raises ``ValueError`` with the reason."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"cannot parse: {exc}") from None
    size_node = root.find("size")
    size = None
    if size_node is not None and size_node.find("width") is not None:
        size = (int(_xml_number(size_node, "width")), int(_xml_number(size_node, "height")))
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        if name not in class_to_label:
            raise ValueError(f"object {k}: unknown class name {name!r} (classes: {', '.join(class_to_label)})")
        diff = obj.find("difficult")
        difficult = diff is not None and (diff.text or "0").strip() not in ("0", "")
        try:
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (_xml_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise ValueError(f"object {k} ({name}): bad <bndbox>: {exc}") from None
        objects.append((class_to_label[name], [xmin - 1.0, ymin - 1.0, xmax, ymax], difficult))
    return size, objects


def voc_det_samples(voc_root: Path, split: str, class_names: Sequence[str], problems: list[str]) -> list[DetSample]:
    """The images of ``ImageSets/Main/<split>.txt``, sorted by id, image ids 1..N in that order; problems are
    appended. An xml file without ``<size>`` takes the image file's size."""
    split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise UserInputError(f"split file {split_file} does not exist (expected {VOCDET_LAYOUT})")
    # A Main/<split>.txt line is "<id>"; the per-class files hold "<id> <flag>" and are not split files.
    ids = sorted(dict.fromkeys(line.split()[0] for line in split_file.read_text().splitlines() if line.strip()))
    class_to_label = {name: k + 1 for k, name in enumerate(class_names)}
    samples = []
    for n, sid in enumerate(ids):
        xml_path, image = voc_root / "Annotations" / f"{sid}.xml", voc_root / "JPEGImages" / f"{sid}.jpg"
        size, objects = None, []
        if not xml_path.is_file():
            problems.append(f"{sid}: missing annotation file {xml_path}")
        else:
            try:
                size, objects = parse_voc_xml(xml_path, class_to_label)
            except ValueError as exc:
                problems.append(f"{xml_path}: {exc}")
        if size is None and image.is_file():
            try:
                size = _probe_image(image)
            except UserInputError:
                size = None  # reported by the image check
        width, height = size or (1, 1)
        xyxy, labels, difficult, gt = [], [], [], []
        for k, (label, box, diff) in enumerate(objects):
            why = box_problem(*box, width, height) if size is not None else None
            if why:
                problems.append(f"{xml_path}: object {k} ({class_names[label - 1]}) box "
                                f"[xmin={box[0] + 1:g}, ymin={box[1] + 1:g}, xmax={box[2]:g}, ymax={box[3]:g}] {why}")
                continue
            xyxy.append(box)
            labels.append(label)
            difficult.append(diff)
            w, h = box[2] - box[0], box[3] - box[1]
            gt.append({"id": 0, "image_id": n + 1, "category_id": label, "bbox": [box[0], box[1], w, h],
                       "area": w * h, "iscrowd": int(diff)})
        samples.append(_sample(sid, image, n + 1, width, height, xyxy, labels, difficult, gt))
    return samples


# ----------------------------------------------------------------------------------------------- checks


def _probe(path: Path) -> tuple[int, int] | str:
    if not path.is_file():
        return f"missing image {path}"
    try:
        return _probe_image(path)
    except UserInputError as exc:
        return str(exc)


def check_images(samples: Sequence[DetSample], problems: list[str], num_threads: int = 0) -> None:
    """Every image exists, decodes (:func:`kdzoo.data.segmentation._probe_image`) and has the size its
    annotation records. Threads: PIL releases the GIL while decoding."""
    threads = num_threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(_probe, [s.image for s in samples]))
    for s, got in zip(samples, results):
        if isinstance(got, str):
            problems.append(f"{s.id}: {got}")
        elif got != (s.width, s.height):
            problems.append(f"{s.id}: the annotation records {s.width}x{s.height} but {s.image} is "
                            f"{got[0]}x{got[1]} (width x height)")


# ----------------------------------------------------------------------------------------------- loaders


class SeededDetectionDataset(Dataset):
    """Decodes sample ``i``; with ``flip``, mirrors it (and its boxes) with probability 0.5 drawn from
    ``random.Random(sample_seed(seed, epoch, i))``. Returns (uint8 [3, H, W], target, i)."""

    def __init__(self, samples: Sequence[DetSample], seed: int, flip: bool):
        self.samples, self.seed, self.flip = list(samples), seed, flip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        s = self.samples[i]
        img = decode_image(s.image)
        if img.size != (s.width, s.height):
            raise UserInputError(f"{s.image} is {img.width}x{img.height} but its annotation records "
                                 f"{s.width}x{s.height}")
        pixels, boxes = np.array(img, dtype=np.uint8), s.boxes
        if self.flip:
            pixels, boxes, _ = random_hflip(pixels, boxes, random.Random(sample_seed(self.seed, self.epoch, i)))
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                  "labels": torch.from_numpy(s.labels.copy())}
        return image, target, i


def collate_detection(items: Sequence[tuple]) -> tuple[list[torch.Tensor], list[dict], torch.Tensor]:
    """Lists instead of stacked tensors: images differ in size (torchvision reference ``utils.collate_fn``)."""
    images, targets, index = zip(*items)
    return list(images), list(targets), torch.tensor(index, dtype=torch.int64)


class _DetLoader(PlannedBatchLoader):
    collate_fn = staticmethod(collate_detection)

    def __init__(self, dataset: SeededDetectionDataset, *, batch_size: int, num_workers: int, device: torch.device):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, device=device)

    def to_batch(self, collated: Any) -> Batch:
        images, targets, index = collated
        dev = self.device
        # uint8 over the bus, [0, 1] floats on the device (ToImage + ToDtype(float, scale=True) in presets.py)
        x = [im.to(dev, non_blocking=True).float().div_(255.0) for im in images]
        t = [{k: v.to(dev, non_blocking=True) for k, v in tgt.items()} for tgt in targets]
        return Batch(x, t, index.to(dev, non_blocking=True))  # type: ignore[arg-type]


class DetTrainLoader(_DetLoader):
    """Shuffled batches grouped by aspect ratio. DDP ranks take every ``world_size``-th sample of the epoch's
    permutation, padded by repetition to an equal count, then group their own share, so every rank has the
    same number of batches."""

    def __init__(self, dataset: SeededDetectionDataset, *, seed: int, group_factor: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.groups = aspect_ratio_groups([(s.width, s.height) for s in dataset.samples], group_factor)

    def __len__(self) -> int:
        return batches_per_rank(len(self.dataset), self.batch_size, self.world_size, self.drop_last)

    def batches(self, epoch: int) -> list[list[int]]:
        order = rank_share(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size).tolist()
        return grouped_batches(order, self.groups, self.batch_size, self.drop_last)


class DetValLoader(_DetLoader):
    """Images in split order; rank r evaluates samples r, r + world_size, ... (no duplicates: the evaluator
    gathers the detections), ``batch_size`` consecutive ones per batch.

    What the COCO evaluator needs rides along: ``coco_gt`` (a COCO instances dict of the evaluated images),
    ``label_to_category`` (label 1..K -> category id) and ``image_ids`` (dataset index -> COCO image id)."""

    def __init__(self, dataset: SeededDetectionDataset, *, coco_gt: dict, label_to_category: dict[int, int],
                 rank: int = 0, world_size: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.coco_gt, self.label_to_category = coco_gt, label_to_category
        self.image_ids = tuple(s.image_id for s in dataset.samples)
        mine = list(range(rank, len(dataset), world_size))
        self._batches = [mine[i: i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def batches(self, epoch: int) -> list[list[int]]:
        return [list(b) for b in self._batches]


def coco_gt_dict(samples: Sequence[DetSample], categories: list[dict]) -> dict:
    """A COCO instances dict of ``samples``' ground truth; annotations without an id get 1, 2, ..."""
    images = [{"id": s.image_id, "width": s.width, "height": s.height, "file_name": s.image.name} for s in samples]
    annotations, next_id = [], 1
    for s in samples:
        for a in s.gt:
            if a["id"] == 0:
                a = {**a, "id": next_id}
                next_id += 1
            annotations.append(a)
    return {"info": {}, "images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


# ----------------------------------------------------------------------------------------------- building


def _positive(cfg: Any, name: str, default: int) -> int:
    value = getattr(cfg, name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"data.{name} must be a positive integer, got {value!r}")
    return value


def _class_names(cfg: Any, name: str) -> tuple[str, ...]:
    requested = getattr(cfg, "class_names", None)
    if name == "trees":
        if requested is not None and tuple(requested) != (trees.TREES_CLASS,):
            raise UserInputError(f"the trees dataset has the one class {trees.TREES_CLASS!r}; data.class_names "
                                 f"{list(requested)!r} does not apply")
        return (trees.TREES_CLASS,)
    if requested is None:
        return VOC_CLASSES
    names = tuple(requested)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise UserInputError(f"data.class_names must be a non-empty list of distinct names, got {requested!r}")
    return names


def _coco_data(cfg: Any, train_split: str, val_split: str, problems: list[str]
               ) -> tuple[list[DetSample], list[DetSample], list[dict], dict[int, int]]:
    root = Path(cfg.root)
    (train_ann, train_dir), (val_ann, val_dir) = (find_coco_annotations(root, s) for s in (train_split, val_split))
    train_json, val_json = read_coco_json(train_ann), read_coco_json(val_ann)
    cat_to_label, categories = coco_category_mapping(train_json["categories"], train_ann)
    if coco_category_mapping(val_json["categories"], val_ann)[1] != categories:
        raise UserInputError(f"{train_ann} and {val_ann} list different categories")
    train = coco_samples(train_json, train_ann, train_dir, cat_to_label, problems)
    val = coco_samples(val_json, val_ann, val_dir, cat_to_label, problems)
    return train, val, categories, {label: cid for cid, label in cat_to_label.items()}


def build_detection_data(cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                         drop_last: bool = False) -> DataBundle:
    """Loaders for ``cfg.dataset`` in :data:`DETECTION_DATASETS`. ``cfg``: a DataConfig; the detection keys are
    read with defaults: train_split "train", val_split "val", keep_empty False, class_names (vocdet; the 20
    VOC classes), min_size 800 (only the bundle's nominal input shape), aspect_ratio_group_factor 0 (two
    groups, width/height < 1 and >= 1; -1: no grouping), num_classes (checked: K + 1 with the background)."""
    name = cfg.dataset
    if name not in DETECTION_DATASETS:
        raise UserInputError(f"unknown detection dataset {name!r}; available: {', '.join(DETECTION_DATASETS)}")
    min_size = _positive(cfg, "min_size", MIN_SIZE)
    keep_empty = getattr(cfg, "keep_empty", False)
    group_factor = getattr(cfg, "aspect_ratio_group_factor", 0)
    if not isinstance(keep_empty, bool):
        raise UserInputError(f"data.keep_empty must be true or false, got {keep_empty!r}")
    if not isinstance(group_factor, int) or isinstance(group_factor, bool) or group_factor < -1:
        raise UserInputError(f"data.aspect_ratio_group_factor must be an integer >= -1, got {group_factor!r}")
    if getattr(cfg, "mean", None) is not None or getattr(cfg, "std", None) is not None:
        raise UserInputError("data.mean/data.std do not apply to detection: torchvision's detectors normalise "
                             "inside the model (GeneralizedRCNNTransform's image_mean / image_std)")
    train_split, val_split = getattr(cfg, "train_split", "train"), getattr(cfg, "val_split", "val")
    problems = _Problems()
    if name == "coco":
        train, val, categories, label_to_category = _coco_data(cfg, train_split, val_split, problems)
    else:
        class_names = _class_names(cfg, name)
        voc_root = trees.prepare_trees_voc(cfg.root) if name == "trees" else find_vocdet_root(cfg.root)
        train = voc_det_samples(voc_root, train_split, class_names, problems)
        val = voc_det_samples(voc_root, val_split, class_names, problems)
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
        label_to_category = {k + 1: k + 1 for k in range(len(class_names))}
    num_classes = len(categories) + 1
    requested = getattr(cfg, "num_classes", None)
    if requested is not None and requested != num_classes:
        raise UserInputError(f"data.num_classes is {requested}, but {name} has {len(categories)} classes + the "
                             f"background = {num_classes}")
    if not keep_empty:
        train = [s for s in train if s.annotated]
    for s in train:  # only the evaluation reads ground-truth dicts (COCO train2017: 860k of them per process)
        s.gt = []
    if getattr(cfg, "subset", None) is not None:
        train = train[: cfg.subset]
    if getattr(cfg, "test_subset", None) is not None:
        val = val[: cfg.test_subset]
    what = f"{name} {train_split}/{val_split}"
    check_images([*train, *val], problems)
    problems.raise_if_any(what)
    for split, samples in ((train_split, train), (val_split, val)):
        if not samples:
            hint = " (no image has a usable annotation; data.keep_empty: true keeps unannotated ones)" \
                if split == train_split and not keep_empty else ""
            raise UserInputError(f"the {name} {split} split is empty{hint}")
    common = {"num_workers": cfg.num_workers, "device": device}
    train_loader = DetTrainLoader(SeededDetectionDataset(train, seed, flip=bool(cfg.augment)), seed=seed,
                                  group_factor=group_factor, batch_size=cfg.batch_size,
                                  drop_last=drop_last or bool(getattr(cfg, "drop_last", False)), rank=rank,
                                  world_size=world_size, **common)
    test_loader = DetValLoader(SeededDetectionDataset(val, seed, flip=False), coco_gt=coco_gt_dict(val, categories),
                               label_to_category=label_to_category, batch_size=cfg.test_batch_size, rank=rank,
                               world_size=world_size, **common)
    info = DatasetInfo(num_samples=len(train), num_classes=num_classes, targets=torch.zeros(0, dtype=torch.long))
    return DataBundle(train_loader, test_loader, info, (3, min_size, min_size), num_classes, test_sharded=True)


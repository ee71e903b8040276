"""COCO box mAP of a detector, with pycocotools' COCOeval (the field's reference implementation).

The model, in eval mode, returns torchvision's detection output (``torchvision.models.detection`` docs): per
image a dict with ``boxes`` (xyxy, in the input image's pixels), ``labels`` (1..K) and ``scores``. As in the
torchvision reference (pytorch/vision ``references/detection/coco_eval.py``, ``prepare_for_coco_detection``)
every box becomes a COCO result ``{image_id, category_id, bbox: [x, y, w, h], score}``, its label mapped back
to the dataset's category id; the ground truth is the COCO instances dict the validation loader carries
(:class:`kdzoo.data.detection.DetValLoader`: ``coco_gt``, ``label_to_category``, ``image_ids``). Under DDP
each process detects on its own share of the images, the results are gathered, rank 0 scores them and
broadcasts the numbers, so every process returns the same record.

This module imports nothing from :mod:`kdzoo.engine.metrics`, so that module can register the evaluator;
``ctx`` is its ``EvalContext`` (``amp``, ``dtype`` and ``sharded`` are read).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdzoo.engine.runtime import autocast
from kdzoo.errors import UserInputError
from kdzoo.types import Batch

try:  # optional until it is a declared dependency; only the detection task needs it
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError:  # pragma: no cover - exercised only where pycocotools is absent
    COCO = COCOeval = None

# COCOeval.stats[0:6]: AP@[.5:.95], AP@.5, AP@.75, AP small / medium / large (all at maxDets=100)
DETECTION_METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
_INSTALL_HINT = "COCO evaluation needs the 'pycocotools' package: pip install pycocotools"


def detections_to_rows(image_id: int, output: Mapping[str, torch.Tensor],
                       label_to_category: Mapping[int, int]) -> tuple[np.ndarray, str | None]:
    """float64 [M, 7] rows (image_id, category_id, x, y, w, h, score) of one image's detections, and an error
    message when a label has no category. xyxy -> xywh is computed in the boxes' float32, as the torchvision
    reference's ``convert_to_xywh``."""
    boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
    labels = output["labels"].detach().cpu().reshape(-1).tolist()
    scores = output["scores"].detach().float().cpu().reshape(-1)
    unknown = sorted({int(v) for v in labels if int(v) not in label_to_category})
    if unknown:
        return np.zeros((0, 7)), (f"the model predicted labels {unknown[:10]} that the dataset has no category for "
                                  f"(labels {min(label_to_category)}..{max(label_to_category)}): does the model's "
                                  "number of classes match the dataset's?")
    x0, y0, x1, y1 = boxes.unbind(1)
    xywh = torch.stack((x0, y0, x1 - x0, y1 - y0), dim=1).double().numpy()
    rows = np.empty((len(labels), 7), dtype=np.float64)
    rows[:, 0] = image_id
    rows[:, 1] = [label_to_category[int(v)] for v in labels]
    rows[:, 2:6] = xywh
    rows[:, 6] = scores.double().numpy()
    return rows, None


def rows_to_results(rows: np.ndarray) -> list[dict]:
    """COCO result dicts (what ``COCO.loadRes`` reads from a results json) of detection rows."""
    return [{"image_id": int(r[0]), "category_id": int(r[1]), "bbox": [float(v) for v in r[2:6]],
             "score": float(r[6])} for r in rows]


def coco_box_map(coco_gt: dict, results: Sequence[dict]) -> dict[str, float]:
    """COCOeval ``bbox`` of ``results`` against the instances dict ``coco_gt``: the six AP numbers in %, or
    -1.0 where COCOeval reports -1 (no ground truth in that area range). Neither argument is modified."""
    if COCOeval is None:
        raise UserInputError(_INSTALL_HINT)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)  # COCOeval writes an 'ignore' flag into the ground truth
        gt.createIndex()
        if results:
            dt = gt.loadRes(copy.deepcopy(list(results)))
        else:  # loadRes needs at least one result; an empty result set scores 0 wherever there is ground truth
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                          "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100.0 * float(v) if v >= 0 else -1.0 for name, v in zip(DETECTION_METRICS, evaluator.stats[:6])}


def _loader_facts(batches: Any) -> tuple[dict, Mapping[int, int], Sequence[int]]:
    facts = tuple(getattr(batches, name, None) for name in ("coco_gt", "label_to_category", "image_ids"))
    if any(f is None for f in facts):
        raise UserInputError("detection evaluation needs the detection validation loader, which carries the COCO "
                             "ground truth (coco_gt, label_to_category, image_ids); got "
                             f"{type(batches).__name__}")
    return facts  # type: ignore[return-value]


@torch.no_grad()
def evaluate_detection(model: nn.Module, batches: Iterable[Batch], ctx: Any) -> dict[str, float]:
    """COCO box AP (%) of ``model`` over the validation loader ``batches``: map (AP@[.5:.95]), map50, map75,
    map_small, map_medium, map_large. With ``ctx.sharded`` under an initialised process group, the detections
    of all processes are scored together and every process returns the same numbers."""
    coco_gt, label_to_category, image_ids = _loader_facts(batches)
    if COCOeval is None:
        raise UserInputError(_INSTALL_HINT)
    was_training = model.training
    model.eval()
    parts: list[np.ndarray] = []
    error: str | None = None
    images = 0
    for batch in batches:
        if not batch.image:
            continue
        with autocast(batch.image[0].device, bool(getattr(ctx, "amp", False)), getattr(ctx, "dtype", torch.bfloat16)):
            outputs = model(list(batch.image))
        for index, output in zip(batch.index.tolist(), outputs):
            rows, why = detections_to_rows(image_ids[index], output, label_to_category)
            parts.append(rows)
            error = error or why
        images += len(batch.image)
    model.train(was_training)
    local = (images, np.concatenate(parts) if parts else np.zeros((0, 7)), error)
    sharded = bool(getattr(ctx, "sharded", False)) and dist.is_available() and dist.is_initialized()
    payloads = [local]
    if sharded:
        payloads = [None] * dist.get_world_size()
        dist.all_gather_object(payloads, local)
    # Every process sees the same gathered payloads, so errors are raised everywhere (no process is left
    # waiting in a collective).
    errors = [p[2] for p in payloads if p[2]]
    if errors:
        raise UserInputError(errors[0])
    if sum(p[0] for p in payloads) == 0:
        raise UserInputError("the evaluation split is empty")
    if not sharded:
        return _score(coco_gt, payloads)
    outcome: Any = None
    if dist.get_rank() == 0:
        try:
            outcome = _score(coco_gt, payloads)
        except UserInputError as exc:  # handed to every process, which all raise it
            outcome = str(exc)
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise UserInputError(box[0])
    return dict(box[0])


def _score(coco_gt: dict, payloads: Sequence[tuple]) -> dict[str, float]:
    rows = np.concatenate([p[1] for p in payloads])
    # One image's detections come from one process, in the model's order; sorting by image id (stable) makes
    # the result list, and so COCOeval's tie-breaking, the same for any number of processes.
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    return coco_box_map(coco_gt, rows_to_results(rows))

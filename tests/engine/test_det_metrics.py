"""COCO box mAP: equal to pycocotools run directly on json files, 100 for perfect detections, 0 for none, the
same under DDP (two gloo processes) as in one process, and the trees demo's ground truth scored end to end."""

from __future__ import annotations

import importlib.metadata
import json
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdzoo.data import trees
from kdzoo.data.detection import build_detection_data
from kdzoo.engine.det_metrics import DETECTION_METRICS, coco_box_map, evaluate_detection
from kdzoo.errors import UserInputError
from kdzoo.types import Batch
from tests.data.test_detection_data import write_voc

CTX = types.SimpleNamespace(amp=False, dtype=torch.bfloat16, sharded=False)

# Categories 3 and 8 are labels 1 and 2. Areas: small < 32^2 <= medium < 96^2 <= large.
GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 640, "height": 480},
               {"id": 5, "width": 50, "height": 50}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 8, "bbox": [30, 20, 50, 40], "area": 2000, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [60, 50, 30, 20], "area": 600, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 8, "bbox": [100, 100, 200, 150], "area": 30000, "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [5, 5, 12, 10], "area": 120, "iscrowd": 0},
        {"id": 6, "image_id": 2, "category_id": 3, "bbox": [300, 200, 80, 60], "area": 4800, "iscrowd": 0},
    ],
}
LABEL_TO_CATEGORY = {1: 3, 2: 8}
# (xyxy, label, score) per image: near misses, a duplicate, hits on the crowd region, a wrong class, a false
# positive on the image without ground truth. Coordinates are multiples of 1/4, exact in float32.
PREDICTIONS = {
    1: [([10.5, 9.75, 30.25, 30.0], 1, 0.9), ([31.0, 22.0, 78.0, 58.0], 2, 0.8), ([11.0, 11.0, 29.0, 31.0], 1, 0.35),
        ([62.0, 51.0, 88.0, 69.0], 1, 0.7), ([30.0, 20.0, 80.0, 60.0], 1, 0.3)],
    2: [([104.0, 96.0, 296.0, 254.0], 2, 0.95), ([6.0, 5.0, 16.0, 16.0], 1, 0.6),
        ([320.0, 210.0, 400.0, 270.0], 1, 0.5), ([500.0, 400.0, 560.0, 450.0], 2, 0.4),
        ([0.0, 0.0, 10.0, 8.0], 1, 0.2)],
    5: [([1.0, 1.0, 20.0, 20.0], 2, 0.65)],
}


class FakeLoader:
    """What the evaluator reads off a detection validation loader; images are blanks of the right sizes."""

    def __init__(self, gt, label_to_category, batch_size=2):
        self.coco_gt, self.label_to_category = gt, label_to_category
        self.image_ids = tuple(i["id"] for i in gt["images"])
        self.batch_size = batch_size

    def __iter__(self):
        imgs = self.coco_gt["images"]
        for s in range(0, len(imgs), self.batch_size):
            part = range(s, min(s + self.batch_size, len(imgs)))
            yield Batch([torch.zeros(3, imgs[k]["height"], imgs[k]["width"]) for k in part], [],
                        torch.tensor(list(part)))


class Replay(torch.nn.Module):
    """Returns the given per-image outputs in the order the images arrive."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = list(outputs), 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        assert not self.training
        out = self.outputs[self.calls: self.calls + len(images)]
        self.calls += len(images)
        return out


def _output(dets):
    if not dets:
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    return {"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([d[1] for d in dets]), "scores": torch.tensor([d[2] for d in dets])}


def _direct_pycocotools(tmp_path, gt, predictions, label_to_category):
    """The reference procedure: ground truth and results as json files, COCO(), loadRes(), COCOeval."""
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": iid, "category_id": label_to_category[lbl],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
               for iid, dets in predictions.items() for box, lbl, score in dets]
    (tmp_path / "results.json").write_text(json.dumps(results))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "results.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[:6]


def test_scores_equal_pycocotools_run_directly(tmp_path):
    model = Replay([_output(PREDICTIONS[i["id"]]) for i in GT["images"]])
    model.train()
    scores = evaluate_detection(model, FakeLoader(GT, LABEL_TO_CATEGORY), CTX)
    assert model.training  # the mode is restored
    stats = _direct_pycocotools(tmp_path, GT, PREDICTIONS, LABEL_TO_CATEGORY)
    assert list(scores) == list(DETECTION_METRICS)
    for name, ref in zip(DETECTION_METRICS, stats):
        assert scores[name] == pytest.approx(100.0 * ref, abs=1e-9), name
    assert 0 < scores["map"] < scores["map50"] < 100  # a set that exercises the metric, not a trivial one
    assert GT["annotations"][0] == {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20],
                                    "area": 400, "iscrowd": 0}  # the loader's ground truth is left untouched


def test_perfect_detections_score_100_and_none_score_0():
    perfect = [_output([([x, y, x + w, y + h], {3: 1, 8: 2}[a["category_id"]], 1.0)
                        for a in GT["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]
                        for x, y, w, h in [a["bbox"]]]) for img in GT["images"]]
    scores = evaluate_detection(Replay(perfect), FakeLoader(GT, LABEL_TO_CATEGORY), CTX)
    # COCOeval's precision is tp / (tp + fp + eps) (cocoeval.py accumulate), hence approx
    assert scores == {name: pytest.approx(100.0, abs=1e-9) for name in DETECTION_METRICS}
    none = evaluate_detection(Replay([_output([])] * 3), FakeLoader(GT, LABEL_TO_CATEGORY), CTX)
    assert none == {name: 0.0 for name in DETECTION_METRICS}
    # an area range without ground truth reads -1, COCOeval's "undefined"
    small_only = {**GT, "annotations": [GT["annotations"][0]]}
    got = coco_box_map(small_only, [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 1.0}])
    assert got["map_small"] == pytest.approx(100.0, abs=1e-9) and got["map_medium"] == got["map_large"] == -1.0


def test_bad_labels_and_loaders_are_user_errors():
    bad = [_output([([1.0, 1.0, 5.0, 5.0], 3, 0.5)])] + [_output([])] * 2
    with pytest.raises(UserInputError, match=r"predicted labels \[3\] that the dataset has no category for"):
        evaluate_detection(Replay(bad), FakeLoader(GT, LABEL_TO_CATEGORY), CTX)
    with pytest.raises(UserInputError, match="needs the detection validation loader"):
        evaluate_detection(Replay([]), [Batch([torch.zeros(3, 4, 4)], [], torch.tensor([0]))], CTX)
    empty = FakeLoader({**GT, "images": []}, LABEL_TO_CATEGORY)
    with pytest.raises(UserInputError, match="the evaluation split is empty"):
        evaluate_detection(Replay([]), empty, CTX)


# ------------------------------------------------------------------------------------------ loader + DDP


def _voc_root(root):
    """Six images with one to three boxes each (VOC 1-based), one of them difficult."""
    rng = np.random.default_rng(3)
    images = {}
    for k in range(6):
        objects = []
        for j in range(1 + k % 3):
            x, y = int(rng.integers(1, 30)), int(rng.integers(1, 20))
            objects.append(("dog" if j % 2 else "cat", x, y, x + int(rng.integers(4, 30)), y + int(rng.integers(4, 20)),
                            int(k == 4 and j == 1)))
        images[f"v{k}"] = (64, 48, objects)
    return write_voc(root, images, {"train": ["v0"], "val": list(images)})


def _noisy_outputs(loader, order):
    """Detections for the images at dataset positions ``order``: each non-crowd box shifted, plus a false
    positive; scores from a fixed generator keyed by the image id, so any process computes the same ones."""
    gt = loader.coco_gt["annotations"]
    outs = []
    for i in order:
        iid = loader.image_ids[i]
        rng = np.random.default_rng(iid)
        dets = [([x + 1.0, y, x + w + 2.0, y + h], a["category_id"], float(rng.random()))
                for a in gt if a["image_id"] == iid and not a["iscrowd"] for x, y, w, h in [a["bbox"]]]
        dets.append(([40.0, 30.0, 60.0, 46.0], 1, float(rng.random())))
        outs.append(_output(sorted(dets, key=lambda d: -d[2])))
    return outs


def _cfg(root):
    return types.SimpleNamespace(dataset="vocdet", root=str(root), batch_size=2, test_batch_size=2, num_workers=0,
                                 subset=None, test_subset=None, augment=False, drop_last=False, mean=None, std=None,
                                 class_names=["cat", "dog"])


def _score(root, rank, world):
    data = build_detection_data(_cfg(root), seed=0, device=torch.device("cpu"), rank=rank, world_size=world)
    order = [i for b in data.test.batches(1) for i in b]
    ctx = types.SimpleNamespace(amp=False, dtype=torch.bfloat16, sharded=world > 1)
    return evaluate_detection(Replay(_noisy_outputs(data.test, order)), data.test, ctx), order


def _worker(rank, world, init_file, root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores, order = _score(root, rank, world)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"scores": scores, "order": order}))
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_gathers_and_every_rank_gets_the_single_process_numbers(tmp_path):
    root = _voc_root(tmp_path / "voc")
    single, order = _score(root, 0, 1)
    assert order == list(range(6)) and 0 < single["map"] < 100
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), root, tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["order"] for r in ranks] == [[0, 2, 4], [1, 3, 5]]  # each process detects on its own share
    assert ranks[0]["scores"] == ranks[1]["scores"] == single


def test_trees_ground_truth_scores_100_for_its_own_boxes(tmp_path):
    try:
        importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("deepforest is not installed (pip install --no-deps deepforest)")
    trees.prepare_trees_voc(tmp_path)
    cfg = types.SimpleNamespace(**{**vars(_cfg(tmp_path)), "dataset": "trees", "class_names": None})
    data = build_detection_data(cfg, seed=0, device=torch.device("cpu"))
    by_image = {}
    for a in data.test.coco_gt["annotations"]:
        if not a["iscrowd"]:  # the mostly hidden (difficult) crowns are neither misses nor false positives
            x, y, w, h = a["bbox"]
            by_image.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], 1, 1.0))
    outputs = [_output(by_image.get(iid, [])) for iid in data.test.image_ids]
    scores = evaluate_detection(Replay(outputs), data.test, CTX)
    for name in ("map", "map50", "map75"):
        assert scores[name] == pytest.approx(100.0, abs=1e-9)

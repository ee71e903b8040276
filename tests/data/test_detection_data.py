"""Detection datasets and loaders: the trees demo through the VOC reader, COCO json and VOC xml parsing, crowd /
difficult handling, aspect-ratio grouping, exact resume, DDP sharding, box-aligned flips and every bad-input
error."""

from __future__ import annotations

import importlib.metadata
import json
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.data import trees
from kdzoo.data.det_transforms import aspect_ratio_groups, grouped_batches, hflip_boxes
from kdzoo.data.detection import DETECTION_DATASETS, VOC_CLASSES, build_detection_data
from kdzoo.errors import UserInputError
from tests.conftest import running_in_ci

CPU = torch.device("cpu")


def _cfg(root, dataset="vocdet", **over):
    base = dict(dataset=dataset, root=str(root), batch_size=3, test_batch_size=2, num_workers=0, subset=None,
                test_subset=None, augment=True, drop_last=False, mean=None, std=None)
    return types.SimpleNamespace(**{**base, **over})


def _save_exact(pixels: np.ndarray, path) -> None:
    """PNG content under the VOC/COCO '.jpg' name: PIL decodes by content, and PNG keeps the pixels exact."""
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="PNG")


def _voc_xml(path, width, height, objects, size=True):
    ann = ET.Element("annotation")
    if size:
        s = ET.SubElement(ann, "size")
        ET.SubElement(s, "width").text, ET.SubElement(s, "height").text = str(width), str(height)
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        box = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = str(v)
    ET.ElementTree(ann).write(path)


def write_voc(root, images: dict, splits: dict, white_boxes: bool = True):
    """images: id -> (width, height, [(name, xmin, ymin, xmax, ymax, difficult), ...]). Each image is black
    with its boxes painted white (VOC's 1-based inclusive indices) and pixel (0, 0) = its position."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, (sid, (w, h, objects)) in enumerate(images.items()):
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        if white_boxes:
            for _, xmin, ymin, xmax, ymax, _ in objects:
                pixels[ymin - 1: ymax, xmin - 1: xmax] = 255
        pixels[0, 0] = k + 1
        _save_exact(pixels, root / "JPEGImages" / f"{sid}.jpg")
        _voc_xml(root / "Annotations" / f"{sid}.xml", w, h, objects)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_coco(root, split, images, annotations, categories):
    """images: [(id, file_name, width, height)]; the image files are written black, of those sizes."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    for _, name, w, h in images:
        _save_exact(np.zeros((h, w, 3)), root / split / name)
    data = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
            "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _ann(aid, image_id, cat, bbox, iscrowd=0, area=None):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": iscrowd,
            "area": area if area is not None else bbox[2] * bbox[3]}


def _mixed_voc(root, n=10):
    """n images alternating landscape 40x24 / portrait 24x40, one 'dog' box each."""
    images = {f"im{k:02d}": ((40, 24) if k % 3 else (24, 40)) + ([("dog", 3 + k, 2, 12 + k, 9, 0)],)
              for k in range(n)}
    ids = list(images)
    return write_voc(root, images, {"train": ids[: n - 3], "val": ids[n - 3:]})


def _batches(loader, epoch, start=0):
    return [(b.index.tolist(), [im.clone() for im in b.image], [{k: v.clone() for k, v in t.items()} for t in b.target])
            for b in loader.iterate(epoch, start)]


def _same(a, b):
    assert a[0] == b[0]
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a[2], b[2]) for k in ("boxes", "labels"))


# ------------------------------------------------------------------------------------------ trees demo


@pytest.fixture(scope="module")
def trees_root(tmp_path_factory):
    try:
        importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        message = "deepforest is not installed (pip install --no-deps deepforest)"
        if running_in_ci():  # CI installs it (.ci/run): a skip there would hide a broken setup
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("trees")
    trees.prepare_trees_voc(root)
    return root


def test_axis_tiles_keep_remainders_of_half_a_tile():
    assert trees.axis_tiles(2299) == [(0, 400), (400, 400), (800, 400), (1200, 400), (1600, 400), (2000, 299)]
    assert trees.axis_tiles(2472) == [(s, 400) for s in range(0, 2400, 400)]  # the 72 px row is dropped
    assert trees.axis_tiles(1035) == [(0, 400), (400, 400), (800, 235)]
    assert trees.axis_tiles(1249) == [(0, 400), (400, 400), (800, 400)]
    assert trees.axis_tiles(400) == [(0, 400)]


def test_clip_to_tile_flags_truncated_and_mostly_hidden_boxes():
    boxes = np.array([[10, 10, 50, 30],    # inside
                      [380, 0, 420, 10],   # exactly half visible: kept, truncated
                      [390, 0, 430, 10],   # a quarter visible: difficult
                      [400, 0, 420, 10]])  # touches the edge only: absent
    got = trees.clip_to_tile(boxes.astype(float), 0, 0, 400, 400)
    assert got == [trees.TileBox(10, 10, 50, 30, False, False), trees.TileBox(380, 0, 400, 10, True, False),
                   trees.TileBox(390, 0, 400, 10, True, True)]
    # tile coordinates are relative to the tile
    assert trees.clip_to_tile(np.array([[410.0, 420, 450, 460]]), 400, 400, 400, 400) == [
        trees.TileBox(10, 20, 50, 60, False, False)]


def test_trees_conversion_layout_split_and_counts(trees_root):
    voc = trees_root / trees.TREES_DIRNAME
    assert sorted(p.name for p in trees_root.iterdir()) == [trees.TREES_DIRNAME]  # no temp dir left behind
    train = (voc / "ImageSets/Main/train.txt").read_text().split()
    val = (voc / "ImageSets/Main/val.txt").read_text().split()
    assert (len(train), len(val)) == (37, 9) and not set(train) & set(val)
    # validation = the bottom tile row of the two YELL images
    assert sorted({i.rsplit("_y", 1)[1][:4] for i in val}) == ["0800", "2000"]
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # whole, truncated, difficult
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            for obj in ET.parse(voc / "Annotations" / f"{i}.xml").getroot().iter("object"):
                assert obj.findtext("name") == "tree"
                kind = 2 if obj.findtext("difficult") == "1" else int(obj.findtext("truncated"))
                counts[split][kind] += 1
    assert counts == {"train": [617, 108, 129], "val": [121, 37, 51]}
    # OSBS_029 is one whole 400x400 tile: its boxes are the source file's, unchanged
    src = sorted(tuple(int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
                 for o in ET.parse(trees.trees_source_dir() / "OSBS_029.xml").getroot().iter("object"))
    tile = sorted(tuple(int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
                  for o in ET.parse(voc / "Annotations" / "OSBS_029_y0000_x0000.xml").getroot().iter("object"))
    assert len(src) == 61 and tile == src
    # a second call reuses the directory
    stamp = (voc / "ImageSets/Main/val.txt").stat().st_mtime_ns
    assert trees.prepare_trees_voc(trees_root) == voc and (voc / "ImageSets/Main/val.txt").stat().st_mtime_ns == stamp


def test_trees_end_to_end_through_the_vocdet_reader(trees_root):
    data = build_detection_data(_cfg(trees_root, "trees", batch_size=4, test_batch_size=3), seed=0, device=CPU)
    assert (data.num_classes, data.info.num_classes, data.input_shape) == (2, 2, (3, 800, 800))
    assert data.info.num_samples == 35  # 37 training tiles, 2 of them without any tree are dropped
    assert data.test_sharded and len(data.train) == 9
    voc = trees_root / trees.TREES_DIRNAME
    train_ids = {s.id for s in data.train.dataset.samples}
    val_ids = [s.id for s in data.test.dataset.samples]
    assert not train_ids & set(val_ids) and len(val_ids) == 9
    seen = set()
    for batch in data.train.iterate(1):
        assert batch.index.dtype == torch.int64 and len(batch.image) == len(batch.target) == len(batch.index)
        for img, tgt in zip(batch.image, batch.target):
            assert img.dtype == torch.float32 and img.shape[0] == 3 and img.min() >= 0 and img.max() <= 1
            h, w = img.shape[1:]
            assert (w, h) in {(400, 400), (299, 400)}
            boxes, labels = tgt["boxes"], tgt["labels"]
            assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and boxes.shape == (len(labels), 4)
            assert labels.tolist() == [1] * len(labels)
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes.min() >= 0 and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        seen.update(batch.index.tolist())
    assert seen == set(range(35))
    # evaluation ground truth: every val box, the mostly hidden ones as crowd regions
    gt = data.test.coco_gt
    assert len(gt["images"]) == 9 and len(gt["annotations"]) == 121 + 37 + 51
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 51
    assert gt["categories"] == [{"id": 1, "name": "tree"}] and data.test.label_to_category == {1: 1}
    # the val loader's first image is the JPEG tile itself, scaled to [0, 1]
    first = next(iter(data.test))
    tile = np.array(Image.open(voc / "JPEGImages" / f"{val_ids[0]}.jpg").convert("RGB"))
    assert torch.equal(first.image[0], torch.from_numpy(tile).permute(2, 0, 1).float() / 255)
    # "trees" is the VOC reader on trees-voc with the one class
    same = build_detection_data(_cfg(voc, "vocdet", class_names=["tree"], batch_size=4), seed=0, device=CPU)
    assert [s.id for s in same.train.dataset.samples] == [s.id for s in data.train.dataset.samples]
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(same.train.dataset.samples,
                                                                data.train.dataset.samples))


# ------------------------------------------------------------------------------------------ loaders


def test_exact_resume_and_workers_reproduce_the_epoch(tmp_path):
    data = build_detection_data(_cfg(_mixed_voc(tmp_path), batch_size=3), seed=5, device=CPU)
    full = _batches(data.train, 2)
    assert len(full) == len(data.train) == 3  # ceil(7 / 3)
    for a, b in zip(full[1:], _batches(data.train, 2, start=1)):
        _same(a, b)
    data.train.num_workers = 1
    for a, b in zip(full, _batches(data.train, 2)):
        _same(a, b)
    other = _batches(data.train, 3)
    assert [b[0] for b in other] != [b[0] for b in full]  # another epoch, another order


def test_batches_are_grouped_by_aspect_ratio():
    sizes = [(40, 24), (24, 40), (30, 30), (10, 20), (64, 48), (20, 30), (50, 20), (21, 40)]
    groups = aspect_ratio_groups(sizes)
    assert groups == [1, 0, 1, 0, 1, 0, 1, 0]  # width / height < 1 -> 0, >= 1 -> 1
    assert aspect_ratio_groups(sizes, -1) == [0] * 8
    assert np.digitize([0.6, 1.2], [0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0]).tolist() == [1, 3]
    assert aspect_ratio_groups([(6, 10), (12, 10)], 1) == [1, 2]  # bins 0.5, 1, 2
    rng = np.random.default_rng(0)
    for n, bs in ((7, 3), (10, 4), (13, 2), (5, 8)):
        groups = rng.integers(0, 2, n).tolist()
        order = rng.permutation(n).tolist()
        for drop_last in (False, True):
            batches = grouped_batches(order, groups, bs, drop_last)
            assert len(batches) == (n // bs if drop_last else -(-n // bs))
            flat = [i for b in batches for i in b]
            assert len(flat) == len(set(flat)) and (len(flat) == n or drop_last)
            # the batches filled within a group come first; only the leftovers after them may mix groups
            filled = sum(groups.count(g) // bs for g in set(groups))
            assert all(len({groups[i] for i in b}) == 1 and len(b) == bs for b in batches[:filled])
    # the grouped loader: portraits and landscapes are batched apart (3 + 4 images, batches of 3)
    assert grouped_batches([0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 0, 1, 1], 3, False) == [[0, 2, 4], [1, 3, 5], [6]]


def test_ranks_partition_the_training_and_the_validation_images(tmp_path):
    root = _mixed_voc(tmp_path)
    per_rank = [build_detection_data(_cfg(root, batch_size=2), seed=1, device=CPU, rank=r, world_size=2)
                for r in range(2)]
    assert len(per_rank[0].train) == len(per_rank[1].train) == 2  # ceil(7 / 2) = 4 samples per rank
    train = [[i for b in d.train.batches(4) for i in b] for d in per_rank]
    assert len(train[0]) == len(train[1]) == 4 and set(train[0]) | set(train[1]) == set(range(7))
    assert len(set(train[0]) & set(train[1])) == 1  # the padding repeats one sample
    val = [[i for b in d.test.iterate(1) for i in b.index.tolist()] for d in per_rank]
    assert val == [[0, 2], [1]]
    single = build_detection_data(_cfg(root), seed=1, device=CPU)
    order = torch.randperm(7, generator=torch.Generator().manual_seed((1 * 1_000_003 + 4) % 2**63)).tolist()
    assert sorted(train[0]) == sorted((order + order[:1])[0::2]) and single.test.image_ids == (1, 2, 3)


def test_flip_keeps_the_boxes_on_the_marked_pixels(tmp_path):
    # one 40x24 image, black, with the box (VOC xmin=5, ymin=3, xmax=14, ymax=10) painted white
    write_voc(tmp_path, {"a": (40, 24, [("cat", 5, 3, 14, 10, 0)]), "b": (40, 24, [("cat", 1, 1, 4, 4, 0)])},
              {"train": ["a"], "val": ["b"]})
    data = build_detection_data(_cfg(tmp_path, batch_size=1), seed=0, device=CPU)
    seen = set()
    for epoch in range(1, 12):
        batch = next(data.train.iterate(epoch))
        img, (x0, y0, x1, y1) = batch.image[0], batch.target[0]["boxes"][0].tolist()
        seen.add((x0, x1))
        inside = img[:, int(y0): int(y1), int(x0): int(x1)]
        assert inside.min() == 1.0 and inside.numel() == 3 * 8 * 10
        assert float(img.sum()) == pytest.approx(inside.numel() + 3 / 255)  # the box, and the id pixel (1, 1, 1)
    assert seen == {(4.0, 14.0), (26.0, 36.0)}  # unflipped (x - 1 of VOC's 1-based xmin) and mirrored: 40 - x
    assert hflip_boxes(np.array([[4.0, 2, 14, 10]]), 40).tolist() == [[26.0, 2, 36, 10]]
    # without augmentation, and in the val loader, nothing is flipped
    plain = build_detection_data(_cfg(tmp_path, batch_size=1, augment=False), seed=0, device=CPU)
    assert {tuple(next(plain.train.iterate(e)).target[0]["boxes"][0].tolist()) for e in range(1, 8)} == {
        (4.0, 2.0, 14.0, 10.0)}


# ------------------------------------------------------------------------------------------ COCO


def _coco_tree(root, categories=({"id": 7, "name": "g"}, {"id": 1, "name": "a"}, {"id": 90, "name": "z"})):
    imgs = [(10, "x.jpg", 50, 40), (11, "y.jpg", 30, 60), (12, "empty.jpg", 20, 20), (13, "crowd.jpg", 20, 20),
            (14, "tiny.jpg", 20, 20)]
    anns = [_ann(1, 10, 7, [1.5, 2.0, 10.0, 20.0]), _ann(2, 10, 90, [0.0, 0.0, 50.0, 40.0], area=1234.5),
            _ann(3, 10, 1, [5.0, 5.0, 10.0, 10.0], iscrowd=1),
            _ann(4, 11, 1, [-0.5, 3.0, 30.4, 20.0]),  # reaches 0.5 px past the left edge: clamped
            _ann(5, 11, 7, [4.0, 4.0, 6.0, 0.0]),  # zero height (as two boxes of train2017): not a target
            _ann(6, 13, 7, [1.0, 1.0, 5.0, 5.0], iscrowd=1), _ann(7, 14, 7, [1.0, 1.0, 1.0, 8.0])]
    write_coco(root, "train2017", imgs, anns, list(categories))
    write_coco(root, "val2017", imgs, anns, list(categories))
    return root


def test_coco_categories_map_to_contiguous_labels_and_back(tmp_path):
    data = build_detection_data(_cfg(_coco_tree(tmp_path), "coco"), seed=0, device=CPU)
    assert data.num_classes == 4 and data.test.label_to_category == {1: 1, 2: 7, 3: 90}
    samples = {s.image_id: s for s in data.train.dataset.samples}
    assert samples[10].labels.tolist() == [2, 3]  # category 7 -> 2, 90 -> 3; the crowd box left out
    np.testing.assert_array_equal(samples[10].boxes, np.array([[1.5, 2, 11.5, 22], [0, 0, 50, 40]], np.float32))
    np.testing.assert_array_equal(samples[11].boxes, np.array([[0, 3, 29.9, 23]], np.float32))
    gt = data.test.coco_gt
    assert [c["id"] for c in gt["categories"]] == [1, 7, 90]
    by_id = {a["id"]: a for a in gt["annotations"]}
    # the evaluation keeps the file's own numbers: category ids, xywh, area, crowd flags
    assert by_id[2] == {"id": 2, "image_id": 10, "category_id": 90, "bbox": [0.0, 0.0, 50.0, 40.0],
                        "area": 1234.5, "iscrowd": 0}
    assert by_id[3]["iscrowd"] == 1 and by_id[5]["bbox"] == [4.0, 4.0, 6.0, 0.0]
    round_trip = {data.test.label_to_category[int(lbl)] for s in data.train.dataset.samples for lbl in s.labels}
    assert round_trip == {1, 7, 90}


def test_coco_crowd_and_empty_images(tmp_path):
    root = _coco_tree(tmp_path)
    data = build_detection_data(_cfg(root, "coco"), seed=0, device=CPU)
    train = {s.image_id: s for s in data.train.dataset.samples}
    # no annotation (12) and only a 1 px wide box (14): dropped (_coco_remove_images_without_annotations);
    # only a crowd box (13): kept, as torchvision's reference does, with an empty target
    assert sorted(train) == [10, 11, 13] and data.info.num_samples == 3
    assert train[13].boxes.shape == (0, 4) and train[13].labels.shape == (0,)
    batch = next(b for b in data.train.iterate(1) if 2 in b.index.tolist())
    empty = batch.target[batch.index.tolist().index(2)]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert data.test.image_ids == (10, 11, 12, 13, 14)  # evaluation keeps every image
    kept = build_detection_data(_cfg(root, "coco", keep_empty=True), seed=0, device=CPU)
    assert [s.image_id for s in kept.train.dataset.samples] == [10, 11, 12, 13, 14]
    sub = build_detection_data(_cfg(root, "coco", subset=2, test_subset=2), seed=0, device=CPU)
    assert [i["id"] for i in sub.test.coco_gt["images"]] == [10, 11] and sub.info.num_samples == 2
    assert {a["image_id"] for a in sub.test.coco_gt["annotations"]} == {10, 11}


def test_coco_bad_input_is_reported_in_one_error(tmp_path):
    root = tmp_path
    imgs = [(1, "a.jpg", 50, 40), (2, "b.jpg", 30, 30), (3, "gone.jpg", 20, 20), (4, "c.jpg", 20, 20)]
    anns = [_ann(1, 1, 1, [45.0, 0.0, 10.0, 10.0]),  # reaches x = 55 in a 50 px image
            _ann(2, 1, 1, [1.0, 1.0, -3.0, 4.0]),  # negative width
            _ann(3, 2, 5, [1.0, 1.0, 3.0, 4.0]),  # unknown category
            _ann(4, 9, 1, [1.0, 1.0, 3.0, 4.0]),  # unknown image
            _ann(5, 2, 1, [1.0, 1.0, 3.0, 4.0])]
    write_coco(root, "train2017", imgs, anns, [{"id": 1, "name": "a"}])
    write_coco(root, "val2017", [(1, "a.jpg", 50, 40)], [_ann(1, 1, 1, [1.0, 1.0, 3.0, 4.0])], [{"id": 1, "name": "a"}])
    (root / "train2017" / "gone.jpg").unlink()
    _save_exact(np.zeros((25, 30, 3)), root / "train2017" / "b.jpg")  # the json says 30x30
    (root / "train2017" / "c.jpg").write_bytes(b"not an image")
    with pytest.raises(UserInputError) as info:
        build_detection_data(_cfg(root, "coco", keep_empty=True), seed=0, device=CPU)
    msg = str(info.value)
    assert msg.startswith("7 problem(s) in the coco train/val data:")
    for part in ("annotation 1 of a.jpg: box [x=45, y=0, w=10, h=10] lies outside the 50x40 image",
                 "annotation 2 of a.jpg: box [x=1, y=1, w=-3, h=4] has a non-positive width or height",
                 "annotation 3 of b.jpg: category_id 5 is not in the categories list",
                 "annotation 4 refers to image id 9, which the images list lacks",
                 "gone.jpg: missing image", "b.jpg: the annotation records 30x30 but",
                 "is 30x25 (width x height)", "c.jpg: cannot decode image"):
        assert part in msg, part
    with pytest.raises(UserInputError, match="no COCO annotation file .*instances_test.json"):
        build_detection_data(_cfg(root, "coco", val_split="test"), seed=0, device=CPU)
    (root / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(UserInputError, match="cannot read COCO annotation file"):
        build_detection_data(_cfg(root, "coco"), seed=0, device=CPU)


# ------------------------------------------------------------------------------------------ VOC xml


def test_voc_difficult_boxes_are_eval_only_and_coordinates_are_continuous(tmp_path):
    write_voc(tmp_path, {"a": (40, 30, [("dog", 1, 1, 40, 30, 0), ("cat", 5, 6, 9, 12, 1)]),
                         "b": (40, 30, [("cat", 2, 3, 20, 25, 1)]), "c": (40, 30, [("person", 11, 2, 20, 8, 0)]),
                         "d": (40, 30, [])}, {"train": ["a", "b", "d"], "val": ["c", "a"]})
    data = build_detection_data(_cfg(tmp_path), seed=0, device=CPU)
    assert data.num_classes == 21
    # d has no object: dropped; b's only box is difficult: kept, with an empty target (as COCO's crowd-only images)
    a, b = data.train.dataset.samples
    np.testing.assert_array_equal(a.boxes, np.array([[0, 0, 40, 30]], np.float32))  # VOC (1, 1, 40, 30)
    assert a.labels.tolist() == [VOC_CLASSES.index("dog") + 1] and b.id == "b" and b.boxes.shape == (0, 4)
    gt = data.test.coco_gt
    assert [i["id"] for i in gt["images"]] == [1, 2] and data.test.image_ids == (1, 2)  # val sorted: a, c
    assert [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in gt["annotations"]] == [
        (1, 12, [0.0, 0.0, 40.0, 30.0], 0), (1, 8, [4.0, 5.0, 5.0, 7.0], 1), (2, 15, [10.0, 1.0, 10.0, 7.0], 0)]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3] and len(gt["categories"]) == 20
    kept = build_detection_data(_cfg(tmp_path, keep_empty=True), seed=0, device=CPU)
    assert [s.id for s in kept.train.dataset.samples] == ["a", "b", "d"]
    assert kept.train.dataset.samples[2].boxes.shape == (0, 4)


def test_voc_bad_input_is_reported_in_one_error(tmp_path):
    ok = ("dog", 1, 1, 5, 5, 0)
    write_voc(tmp_path, {"a": (40, 30, [("dgo", 1, 1, 5, 5, 0)]), "b": (40, 30, [("dog", 9, 1, 5, 5, 0)]),
                         "c": (40, 30, [("dog", 1, 1, 43, 30, 0)]), "d": (40, 30, [ok]), "e": (40, 30, [ok]),
                         "f": (40, 30, [ok]), "g": (40, 30, [ok]), "v": (40, 30, [ok])},
              {"train": ["a", "b", "c", "d", "e", "f", "g", "h"], "val": ["v"]})
    (tmp_path / "JPEGImages" / "d.jpg").unlink()
    _save_exact(np.zeros((30, 41, 3)), tmp_path / "JPEGImages" / "e.jpg")
    (tmp_path / "JPEGImages" / "f.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "Annotations" / "g.xml").write_text("<annotation><object>")
    with pytest.raises(UserInputError) as info:
        build_detection_data(_cfg(tmp_path), seed=0, device=CPU)
    msg = str(info.value)
    assert msg.startswith("8 problem(s) in the vocdet train/val data:")
    for part in ("a.xml: object 0: unknown class name 'dgo'",
                 "b.xml: object 0 (dog) box [xmin=9, ymin=1, xmax=5, ymax=5] has a non-positive width or height",
                 "c.xml: object 0 (dog) box [xmin=1, ymin=1, xmax=43, ymax=30] lies outside the 40x30 image",
                 "d: missing image", "e: the annotation records 40x30 but", "is 41x30",
                 "f: cannot decode image", "g.xml: cannot parse", "h: missing annotation file"):
        assert part in msg, part
    # more than ten problems: ten listed, the rest counted
    many = {f"m{k:02d}": (40, 30, [("dog", 1, 1, 50, 5, 0)]) for k in range(12)}
    write_voc(tmp_path / "many", {**many, "v": (40, 30, [ok])}, {"train": list(many), "val": ["v"]})
    with pytest.raises(UserInputError, match=r"(?s)^12 problem\(s\).*m09.xml.*\.\.\. and 2 more$"):
        build_detection_data(_cfg(tmp_path / "many"), seed=0, device=CPU)


def test_config_checks(tmp_path):
    root = _mixed_voc(tmp_path)
    assert DETECTION_DATASETS == ("coco", "vocdet", "trees")
    with pytest.raises(UserInputError, match="unknown detection dataset 'voc'"):
        build_detection_data(_cfg(root, "voc"), seed=0, device=CPU)
    with pytest.raises(UserInputError, match=r"data.num_classes is 20, but vocdet has 20 classes \+ the background"):
        build_detection_data(_cfg(root, num_classes=20), seed=0, device=CPU)
    with pytest.raises(UserInputError, match="data.mean/data.std do not apply to detection"):
        build_detection_data(_cfg(root, mean=[0.5, 0.5, 0.5]), seed=0, device=CPU)
    with pytest.raises(UserInputError, match="unknown class name 'dog' \\(classes: cat, person\\)"):
        build_detection_data(_cfg(root, class_names=["cat", "person"]), seed=0, device=CPU)
    custom = build_detection_data(_cfg(root, class_names=["dog"]), seed=0, device=CPU)
    assert custom.num_classes == 2 and custom.test.coco_gt["categories"] == [{"id": 1, "name": "dog"}]
    with pytest.raises(UserInputError, match="no Pascal VOC detection data"):
        build_detection_data(_cfg(tmp_path / "nowhere"), seed=0, device=CPU)

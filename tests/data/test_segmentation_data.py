"""Segmentation datasets and loaders: VOC (+SBD), Cityscapes, segfolder, the nuclei demo; exact resume, DDP
sharding, the reference's transforms and every bad-input error."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from kdzoo.data import nuclei
from kdzoo.data.seg_transforms import FixedResize, TrainTransform, mask_image, random_hflip, short_side_size
from kdzoo.data.segmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEGMENTATION_DATASETS,
    build_segmentation_data,
)
from kdzoo.errors import UserInputError

CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _cfg(root, dataset="voc", **over):
    base = dict(dataset=dataset, root=str(root), batch_size=4, test_batch_size=4, num_workers=0, subset=None,
                test_subset=None, augment=True, drop_last=False, mean=None, std=None, crop_size=64, base_size=64)
    return types.SimpleNamespace(**{**base, **over})


def _save_palette(mask: np.ndarray, path):
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def _voc_tree(root, train=("a", "b", "c"), val=("d", "e"), sizes=None, classes=21, seed=0):
    """A VOC 2012 tree under root/VOCdevkit/VOC2012 with random images and palette masks."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*train, *val]):
        w, h = (sizes or {}).get(name, (40 + 2 * i, 30))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = rng.integers(0, classes, (h, w))
        mask[0, :3] = 255
        _save_palette(mask, voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return voc


@pytest.fixture(scope="module")
def nuclei_root(tmp_path_factory):
    pytest.importorskip("tifffile")
    root = tmp_path_factory.mktemp("nuclei")
    nuclei.prepare_nuclei_voc(root)
    return root


# ------------------------------------------------------------------------------------------ nuclei demo


def test_nuclei_conversion_layout_split_and_class_fractions(nuclei_root):
    voc = nuclei_root / nuclei.NUCLEI_DIRNAME
    assert not [p for p in nuclei_root.iterdir() if p.name != nuclei.NUCLEI_DIRNAME]  # no temp dir left
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 35 and len(val) == 4 and not set(train) & set(val)
    # Train tiles inside columns [0, 384), val tiles inside [384, 512): no shared pixel.
    assert max(int(i.split("_x")[1]) + 128 for i in train) == 384
    assert min(int(i.split("_x")[1]) for i in val) == 384
    counts = np.zeros(256)
    for tile in train + val:
        mask = Image.open(voc / "SegmentationClass" / f"{tile}.png")
        image = Image.open(voc / "JPEGImages" / f"{tile}.jpg")
        assert mask.mode == "P" and mask.size == image.size == (128, 128) and image.mode == "RGB"
        counts += np.bincount(np.array(mask).ravel(), minlength=256)
    assert counts[3:].sum() == 0
    background, interior, boundary = counts[:3] / counts.sum()
    assert 0.6 < background < 0.9 and 0.1 < interior < 0.3 and 0.03 < boundary < 0.12
    # Reused, not rewritten, on the next call.
    stamp = (voc / "ImageSets/Segmentation/val.txt").stat().st_mtime_ns
    assert nuclei.prepare_nuclei_voc(nuclei_root) == voc
    assert (voc / "ImageSets/Segmentation/val.txt").stat().st_mtime_ns == stamp


def test_semantic_from_instances_by_hand():
    inst = np.zeros((6, 7), dtype=np.uint16)
    inst[1:5, 1:4] = 1
    inst[1:5, 4:6] = 2  # touches nucleus 1
    sem = nuclei.semantic_from_instances(inst)
    expected = np.array([
        [0, 2, 2, 2, 2, 2, 0],
        [2, 2, 2, 2, 2, 2, 2],
        [2, 2, 1, 2, 2, 2, 2],
        [2, 2, 1, 2, 2, 2, 2],
        [2, 2, 2, 2, 2, 2, 2],
        [0, 2, 2, 2, 2, 2, 0],
    ])
    assert np.array_equal(sem, expected)
    skimage_seg = pytest.importorskip("skimage.segmentation")
    rng = np.random.default_rng(1)
    blobs = rng.integers(0, 4, (20, 20)).repeat(3, 0).repeat(3, 1)
    assert np.array_equal(nuclei.semantic_from_instances(blobs) == 2,
                          skimage_seg.find_boundaries(blobs, mode="thick"))


def test_nuclei_through_voc_loader(nuclei_root):
    data = build_segmentation_data(_cfg(nuclei_root, "nuclei", test_batch_size=3), seed=3, device=CPU)
    assert "nuclei" in SEGMENTATION_DATASETS
    assert data.num_classes == 3 and data.input_shape == (3, 64, 64) and data.info.num_samples == 35
    assert data.info.targets.shape == (0,) and data.test_sharded
    batches = list(data.train.iterate(epoch=1))
    assert len(batches) == len(data.train) == 9
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(35))
    b = batches[0]
    assert b.image.dtype == torch.float32 and b.image.shape == (4, 3, 64, 64)
    assert b.target.dtype == torch.int64 and b.target.shape == (4, 64, 64) and b.index.dtype == torch.int64
    labels = set(torch.cat([x.target.flatten() for x in batches]).unique().tolist())
    assert labels <= {0, 1, 2, 255} and {0, 1, 2} <= labels
    val = list(data.test)
    # 4 val tiles, 128 -> 64 on the short side, all the same size: batches of 3 + 1.
    assert [v.image.shape for v in val] == [(3, 3, 64, 64), (1, 3, 64, 64)]
    assert torch.cat([v.index for v in val]).tolist() == [0, 1, 2, 3]
    assert set(torch.cat([v.target.flatten() for v in val]).unique().tolist()) <= {0, 1, 2}


# ---------------------------------------------------------------------------------- resume and sharding


def test_exact_resume_across_worker_counts(nuclei_root):
    full = list(build_segmentation_data(_cfg(nuclei_root, "nuclei", num_workers=2), seed=7,
                                        device=CPU).train.iterate(epoch=2))
    tail = list(build_segmentation_data(_cfg(nuclei_root, "nuclei"), seed=7, device=CPU).train.iterate(
        epoch=2, start_step=5))
    assert len(tail) == len(full) - 5 == 4
    for a, b in zip(full[5:], tail):
        assert torch.equal(a.index, b.index) and torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
    other = next(iter(build_segmentation_data(_cfg(nuclei_root, "nuclei"), seed=7, device=CPU).train.iterate(3)))
    assert not torch.equal(other.index, full[0].index)  # a new epoch, a new order


def test_two_ranks_partition_train_and_val(tmp_path):
    _voc_tree(tmp_path, train=tuple("abcdef"), val=tuple("ghijk"))
    idx = {}
    for rank in (0, 1):
        data = build_segmentation_data(_cfg(tmp_path, batch_size=2), seed=1, device=CPU, rank=rank, world_size=2)
        idx[rank] = (torch.cat([b.index for b in data.train.iterate(1)]).tolist(),
                     torch.cat([b.index for b in data.test]).tolist())
        assert len(data.train) == 2
    assert sorted(idx[0][0] + idx[1][0]) == list(range(6))
    assert idx[0][1] == [0, 2, 4] and idx[1][1] == [1, 3]  # val: rank::world_size, no padding duplicates


# -------------------------------------------------------------------------------- transforms and numbers


def test_val_is_fixed_resize_normalised_on_device_and_grouped_by_size(tmp_path):
    sizes = {"d": (64, 48), "e": (64, 48), "f": (40, 80), "g": (64, 48)}
    voc = _voc_tree(tmp_path, val=("d", "e", "f", "g"), sizes=sizes)
    val = list(build_segmentation_data(_cfg(tmp_path, crop_size=48), seed=0, device=CPU).test)
    assert [tuple(v.image.shape) for v in val] == [(2, 3, 48, 64), (1, 3, 96, 48), (1, 3, 48, 64)]
    assert short_side_size(40, 80, 48) == (48, 96)
    # d is already 48 on its short side: the batch is exactly (pixel / 255 - mean) / std, the mask untouched.
    pixels = torch.from_numpy(np.array(Image.open(voc / "JPEGImages/d.jpg"))).permute(2, 0, 1).float()
    assert torch.allclose(val[0].image[0], (pixels / 255 - MEAN) / STD, atol=1e-5)
    mask = torch.from_numpy(np.array(Image.open(voc / "SegmentationClass/d.png")).astype(np.int64))
    assert torch.equal(val[0].target[0], mask) and val[0].target[0, 0, :3].tolist() == [255] * 3


def test_train_padding_is_ignore_for_mask_and_black_for_image(tmp_path):
    _voc_tree(tmp_path, train=("a",), val=("d",), sizes={"a": (20, 20)})
    # Short side drawn from [8, 32] < crop 48: always padded on the right and bottom.
    data = build_segmentation_data(_cfg(tmp_path, crop_size=48, base_size=16, batch_size=1), seed=0, device=CPU)
    for epoch in (1, 2, 3):
        b = next(iter(data.train.iterate(epoch)))
        assert b.image.shape == (1, 3, 48, 48)
        assert (b.target[0, 32:, :] == 255).all() and (b.target[0, :, 32:] == 255).all()
        assert torch.allclose(b.image[0, :, 40:, 40:], (-MEAN / STD).expand(3, 8, 8), atol=1e-6)


def test_flip_keeps_image_and_mask_aligned():
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[2:12, 3:15] = 1  # top-left block: asymmetric under a horizontal flip
    img = Image.fromarray(np.stack([mask * 255, np.zeros_like(mask), np.zeros_like(mask)], axis=2))
    flipped = {random_hflip(img, mask_image(mask, 255), random.Random(s))[1].getpixel((5, 5)) for s in range(20)}
    assert flipped == {0, 1}  # both branches were taken
    seen_flip = False
    for s in range(12):
        out_img, out_mask = TrainTransform(40, 32, 255)(img, mask_image(mask, 255), random.Random(s))
        red, m = np.array(out_img)[:, :, 0].astype(float), np.array(out_mask)
        assert out_img.size == out_mask.size == (32, 32)
        if (m == 1).any():
            assert red[m == 1].mean() > 150
        assert red[m == 0].mean() < 100
        seen_flip |= random.Random(s).random() < 0.5
    assert seen_flip


def test_augment_false_is_deterministic_center_crop(tmp_path):
    _voc_tree(tmp_path, sizes={"a": (60, 30), "b": (30, 60), "c": (50, 50)})
    data = build_segmentation_data(_cfg(tmp_path, augment=False, crop_size=24, batch_size=3), seed=0, device=CPU)
    e1, e2 = next(iter(data.train.iterate(1))), next(iter(data.train.iterate(2)))
    assert e1.image.shape == (3, 3, 24, 24)
    order1, order2 = e1.index.argsort(), e2.index.argsort()
    assert torch.equal(e1.image[order1], e2.image[order2]) and torch.equal(e1.target[order1], e2.target[order2])
    assert FixedResize(24).output_size(60, 30) == (48, 24)


# ------------------------------------------------------------------------------------ SBD and Cityscapes


def test_sbd_merge_follows_combine_dbs(tmp_path):
    _voc_tree(tmp_path / "voc", train=("a", "b"), val=("c",))
    sbd = tmp_path / "sbd" / "dataset"
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    for name in ("b", "c", "d", "e"):
        Image.fromarray(np.full((20, 24, 3), 99, np.uint8)).save(sbd / "img" / f"{name}.jpg")
        seg = np.full((20, 24), 7, np.uint8)
        seg[:, :12] = 3
        scipy.io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": [3, 7]}})
    (sbd / "train.txt").write_text("b\nc\nd\n")
    (sbd / "val.txt").write_text("e\nd\n")
    cfg = _cfg(tmp_path / "voc", sbd_root=str(tmp_path / "sbd"), augment=False, crop_size=20, batch_size=8)
    data = build_segmentation_data(cfg, seed=0, device=CPU)
    samples = data.train.dataset.samples
    # VOC train + SBD train+val, each id once (VOC's copy of b), minus the VOC val id c.
    assert [(s.id, s.mask_kind) for s in samples] == [("a", "png"), ("b", "png"), ("d", "sbd"), ("e", "sbd")]
    assert data.info.num_samples == 4
    batch = next(iter(data.train.iterate(1)))
    sbd_rows = batch.target[(batch.index >= 2).nonzero().flatten()]
    assert set(sbd_rows.unique().tolist()) == {3, 7}
    with pytest.raises(UserInputError, match="does not apply to dataset 'segfolder'"):
        build_segmentation_data(_cfg(tmp_path, "segfolder", sbd_root="x", num_classes=2), seed=0, device=CPU)


def _city_tree(root, gt_parent, suffix, values):
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (gt_parent / "gtFine" / split / city).mkdir(parents=True)
            for k in range(2):
                stem = f"{city}_{k:06d}_000019"
                Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                mask = np.array(values, np.uint8).repeat(32 // len(values))[None].repeat(16, 0)
                Image.fromarray(mask).save(gt_parent / "gtFine" / split / city / f"{stem}_gtFine_{suffix}.png")


def test_cityscapes_layouts(tmp_path):
    plain = tmp_path / "plain"
    _city_tree(plain, plain, "labelTrainIds", [0, 18, 255, 5])
    data = build_segmentation_data(_cfg(plain, "cityscapes", augment=False, crop_size=16), seed=0, device=CPU)
    assert data.num_classes == 19 and data.info.num_samples == 4
    assert [s.id for s in data.train.dataset.samples] == ["aachen/aachen_000000_000019",
                                                         "aachen/aachen_000001_000019",
                                                         "bremen/bremen_000000_000019",
                                                         "bremen/bremen_000001_000019"]
    val = list(data.test)
    assert len(val) == 1 and val[0].target[0, 0].tolist()[::8] == [0, 18, 255, 5]
    # The raw download: gtFine_trainvaltest/gtFine with labelIds, mapped to trainIds (7 road -> 0, 26 car -> 13,
    # 0 unlabelled -> ignore, 33 bicycle -> 18).
    raw = tmp_path / "raw"
    _city_tree(raw, raw / "gtFine_trainvaltest", "labelIds", [7, 26, 0, 33])
    val = list(build_segmentation_data(_cfg(raw, "cityscapes", crop_size=16), seed=0, device=CPU).test)
    assert val[0].target[0, 0].tolist()[::8] == [0, 13, 255, 18]
    with pytest.raises(UserInputError, match="no Cityscapes data at .*leftImg8bit"):
        build_segmentation_data(_cfg(tmp_path / "none", "cityscapes"), seed=0, device=CPU)


def test_segfolder_needs_num_classes(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for name in ("x", "y"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / split / f"{name}.png")
            Image.fromarray(np.eye(8, dtype=np.uint8) * 4).save(tmp_path / "masks" / split / f"{name}.png")
    with pytest.raises(UserInputError, match="segfolder needs data.num_classes"):
        build_segmentation_data(_cfg(tmp_path, "segfolder"), seed=0, device=CPU)
    with pytest.raises(UserInputError, match=r"mask values \[4\] are neither classes 0..3"):
        build_segmentation_data(_cfg(tmp_path, "segfolder", num_classes=4), seed=0, device=CPU)
    data = build_segmentation_data(_cfg(tmp_path, "segfolder", num_classes=5, crop_size=8), seed=0, device=CPU)
    assert data.num_classes == 5 and torch.equal(next(iter(data.test)).target[0], torch.eye(8).long() * 4)


# ------------------------------------------------------------------------------------------- bad inputs


def _expect(root, match, **over):
    with pytest.raises(UserInputError, match=match):
        build_segmentation_data(_cfg(root, **over), seed=0, device=CPU)


def test_bad_voc_inputs_are_reported_before_training(tmp_path):
    _expect(tmp_path / "nowhere", r"no Pascal VOC 2012 data at .*nowhere \(expected <root>/VOCdevkit/VOC2012")
    voc = _voc_tree(tmp_path)
    _expect(tmp_path, r"split file .*ImageSets/Segmentation/trainaug.txt does not exist", train_split="trainaug")
    _expect(tmp_path, "data.num_classes is 5, but voc has 21 classes", num_classes=5)

    (voc / "JPEGImages/a.jpg").rename(voc / "a.jpg")
    (voc / "SegmentationClass/b.png").unlink()
    _expect(tmp_path, r"2 problem\(s\) in the voc train data:\n  a: missing .*JPEGImages/a.jpg\n  b: missing "
                      r".*SegmentationClass/b.png")
    (voc / "a.jpg").rename(voc / "JPEGImages/a.jpg")
    _save_palette(np.zeros((30, 42)), voc / "SegmentationClass/b.png")

    _save_palette(np.zeros((31, 44)), voc / "SegmentationClass/c.png")  # image c is 44x30
    _expect(tmp_path, r"c.png: mask is 44x31 but image .*c.jpg is 44x30")
    bad = np.zeros((30, 44))
    bad[0, 0], bad[1, 1] = 21, 254
    _save_palette(bad, voc / "SegmentationClass/c.png")
    _expect(tmp_path, r"SegmentationClass/c.png: mask values \[21, 254\] are neither classes 0..20 nor the "
                      r"ignore index 255")
    Image.fromarray(np.zeros((30, 44, 3), np.uint8)).save(voc / "SegmentationClass/c.png")
    _expect(tmp_path, r"c.png: the mask is a RGB image, but masks must hold class indices")
    _save_palette(np.zeros((30, 44)), voc / "SegmentationClass/c.png")

    whole = (voc / "JPEGImages/d.jpg").read_bytes()
    (voc / "JPEGImages/d.jpg").write_bytes(b"not a jpeg")
    _expect(tmp_path, r"voc val data:\n  cannot decode image .*JPEGImages/d.jpg")
    (voc / "JPEGImages/d.jpg").write_bytes(whole[: len(whole) // 2])
    _expect(tmp_path, r"cannot decode image .*d.jpg: image file is truncated")
    (voc / "JPEGImages/d.jpg").write_bytes(whole)
    assert build_segmentation_data(_cfg(tmp_path), seed=0, device=CPU).info.num_samples == 3
    _expect(tmp_path, "data.ignore_index 3 is one of the 21 classes", ignore_index=3)


def test_nuclei_without_stardist_names_the_install(monkeypatch, tmp_path):
    def missing(name):
        raise nuclei.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(nuclei.importlib.metadata, "distribution", missing)
    with pytest.raises(UserInputError, match="pip install stardist tifffile"):
        build_segmentation_data(_cfg(tmp_path, "nuclei"), seed=0, device=CPU)

"""CIFAR reader on the real files, safe unpickling, and the batched augmentation against torchvision."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from kdzoo.data.cifar import CIFAR100_MEAN, CIFAR100_STD, load_cifar_split
from kdzoo.data.safe_pickle import load_pickle
from kdzoo.data.tensor_loader import CropFlip, TensorBatchLoader
from kdzoo.errors import UserInputError


def test_reads_real_cifar100(data_root):
    images, labels = load_cifar_split(data_root, "cifar100", train=False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and int(labels.min()) == 0 and int(labels.max()) == 99
    assert torch.bincount(labels).tolist() == [100] * 100  # CIFAR-100 test: 100 images per class
    # Row layout: the 1024 red values, then green, then blue (data/README.md).
    raw = load_pickle(data_root / "cifar-100-python" / "test")
    assert np.array_equal(images[7].numpy().reshape(-1), raw["data"][7])
    train_images, train_labels = load_cifar_split(data_root, "cifar100", train=True)
    assert train_images.shape == (50000, 3, 32, 32) and torch.bincount(train_labels).tolist() == [500] * 100


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch kdzoo_pwned_marker",))


def test_crafted_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "test"
    evil.write_bytes(pickle.dumps({"data": _RunsCode(), "fine_labels": [0]}))
    with pytest.raises(UserInputError, match="refusing to load global"):
        load_pickle(evil)
    assert not (tmp_path / "kdzoo_pwned_marker").exists()


def test_missing_and_corrupt_dataset_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_cifar_split(tmp_path, "cifar100", train=True)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserInputError, match="corrupt"):
        load_cifar_split(tmp_path, "cifar100", train=True)


def _loader(images, labels, **kw):
    return TensorBatchLoader(images, labels, batch_size=8, mean=CIFAR100_MEAN, std=CIFAR100_STD, **kw)


def test_batched_crop_flip_equals_torchvision_per_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(20)
    loader = _loader(images, labels, augment=CropFlip(4), seed=3)
    plan = loader.plan(epoch=2)
    batch = next(loader.iterate(epoch=2))
    for row in range(8):
        i = int(plan.order[row])
        x, y, flip = int(plan.crop_x[row]), int(plan.crop_y[row]), bool(plan.flip[row])
        expected = TF.crop(TF.pad(images[i], [4]), y, x, 32, 32)  # RandomCrop(32, padding=4) at (y, x)
        if flip:
            expected = TF.hflip(expected)
        expected = TF.normalize(expected.float() / 255, CIFAR100_MEAN, CIFAR100_STD)
        assert torch.equal(batch.image[row], expected), row
        assert int(batch.target[row]) == i and int(batch.index[row]) == i
    assert batch.crop[:, 2].tolist() == plan.flip[:8].long().tolist()


def test_plan_is_a_function_of_seed_and_epoch_and_resume_matches():
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    loader = _loader(images, torch.arange(30), augment=CropFlip(4), seed=1)
    full = list(loader.iterate(epoch=5))
    tail = list(_loader(images, torch.arange(30), augment=CropFlip(4), seed=1).iterate(epoch=5, start_step=2))
    assert len(full) == 4 and len(tail) == 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.image, b.image) and torch.equal(a.index, b.index)
    other_epoch = next(loader.iterate(epoch=6))
    assert not torch.equal(other_epoch.index, full[0].index)
    # Per-epoch augmentation statistics: offsets cover 0..8, about half the images flipped.
    plan = _loader(torch.zeros(5000, 3, 32, 32, dtype=torch.uint8), torch.zeros(5000), augment=CropFlip(4)).plan(1)
    assert set(plan.crop_x.tolist()) == set(range(9)) and 0.45 < plan.flip.float().mean() < 0.55


def test_distributed_shards_are_disjoint_and_cover_the_epoch():
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    shards = [_loader(images, torch.arange(10), rank=r, world_size=3, seed=4).plan(1).order for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length like DistributedSampler
    assert set(torch.cat(shards).tolist()) == set(range(10))

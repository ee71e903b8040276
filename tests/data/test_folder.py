"""ImageFolder-style datasets through worker processes, with exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.config.loader import config_from_dict
from kdzoo.data.datasets import build_data
from kdzoo.errors import UserInputError


def _make_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def _data(root, **data):
    cfg = config_from_dict({"data": {"dataset": "imagefolder", "root": str(root), "batch_size": 4,
                                     "image_size": 32, "num_workers": 2, **data}})
    return build_data(cfg.data, seed=5, device=torch.device("cpu"))


def test_imagefolder_batches_and_exact_resume(tmp_path):
    _make_folder(tmp_path)
    data = _data(tmp_path)
    assert data.num_classes == 3 and data.input_shape == (3, 32, 32) and data.info.num_samples == 15
    full = list(data.train.iterate(epoch=2))
    assert len(full) == 4 and full[0].image.shape == (4, 3, 32, 32)
    assert sorted(torch.cat([b.index for b in full]).tolist()) == list(range(15))
    tail = list(_data(tmp_path, num_workers=0).train.iterate(epoch=2, start_step=2))
    for a, b in zip(full[2:], tail):  # same crops whichever process decodes them
        assert torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
    test = list(data.test)
    assert sum(len(b.target) for b in test) == 15


def test_imagefolder_subset_keeps_every_class(tmp_path):
    _make_folder(tmp_path)  # 3 classes x 5, listed class by class
    data = _data(tmp_path, subset=6, test_subset=3, num_workers=0)
    assert data.info.num_samples == 6 and data.info.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert [t for b in data.test for t in b.target.tolist()] == [0, 1, 2]
    assert _data(tmp_path, subset=99, num_workers=0).info.num_samples == 15


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        _data(tmp_path / "nothing")
    _make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    data = _data(tmp_path, num_workers=0)
    with pytest.raises(UserInputError, match="cannot decode image"):
        list(data.train.iterate(epoch=1))

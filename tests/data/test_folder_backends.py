"""The class-folder loading backends on real JPEG photographs (greyscale and CMYK files among them): the `device`
backend (batched decode + crops on the run's device) and the `dali` backend (an NVIDIA DALI pipeline, CPU-only here)
against the `torch` reference (PIL in workers), and bad input — truncated files, empty class folders, a backend
that cannot run a dataset's augmentation, DALI not installed."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from kdzoo.config.loader import config_from_dict
from kdzoo.data import dali_augment
from kdzoo.data.datasets import build_data
from kdzoo.data.folder import jpeg_is_complete
from kdzoo.data.sample_photos import build_photo_folder
from kdzoo.errors import UserInputError

DALI = pytest.param("dali", marks=pytest.mark.skipif(not dali_augment.dali_available(),
                                                    reason="NVIDIA DALI is not installed (pip install -e '.[dali]')"))
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return build_photo_folder(tmp_path_factory.mktemp("photos"), train_per_class=3, val_per_class=1,
                              greyscale_every=5, cmyk_every=7)


def _data(root, **data):
    cfg = config_from_dict({"data": {"dataset": "imagefolder", "root": str(root), "batch_size": 8, "image_size": 48,
                                     "num_workers": 0, **data}})
    return build_data(cfg.data, seed=3, device=torch.device("cpu"))


def _levels(image):
    """Normalised images back to uint8 levels."""
    return (image * STD + MEAN) * 255


def test_photo_folder_has_the_modes_imagenet_has(photos):
    modes = set()
    for path in (photos / "train").rglob("*.JPEG"):
        with Image.open(path) as img:
            modes.add(img.mode)
            assert img.format == "JPEG" and 240 <= min(img.size) <= 500
    assert modes == {"RGB", "L", "CMYK"}


# Training-crop pixel bounds against PIL, in uint8 levels: (whole image max, inside the outermost 3 pixels max,
# mean). device: PIL's and torch's antialiased bilinear resampling round differently at a few pixels. dali: the
# decoded pixels equal PIL's, but DALI's resampler weighs a crop's outermost pixels differently (measured on these
# photos: up to 19 levels there, 0.15 on average over the image). Evaluation is within one level on both.
TRAIN_PIXEL_BOUNDS = {"device": (1.0, 1.0, 0.25), "dali": (32.0, 1.0, 0.3)}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("loader", ["device", DALI])
def test_device_backends_match_torch_backend(photos, loader, workers):
    """Same sample plan, order, crop parameters and labels as PIL in workers, pixels within the bounds above."""
    whole, inside, mean = TRAIN_PIXEL_BOUNDS[loader]
    reference = _data(photos)
    backend = _data(photos, loader=loader, num_workers=workers)
    for epoch in (1, 2):
        ref_batches = list(reference.train.iterate(epoch))
        backend_batches = list(backend.train.iterate(epoch))
        assert len(ref_batches) == len(backend_batches) == len(reference.train)
        for a, b in zip(ref_batches, backend_batches):
            assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target) and torch.equal(a.crop, b.crop)
            assert b.image.shape == a.image.shape and b.image.dtype == torch.float32
            difference = (_levels(a.image) - _levels(b.image)).abs()
            assert float(difference.max()) <= whole + 1e-3
            assert float(difference[:, :, 3:-3, 3:-3].max()) <= inside + 1e-3
            assert float(difference.mean()) < mean
    for a, b in zip(reference.test, backend.test):
        assert torch.equal(a.target, b.target)
        assert float((_levels(a.image) - _levels(b.image)).abs().max()) <= 1.0 + 1e-3


@pytest.mark.parametrize("loader", ["device", DALI])
def test_device_backends_resume_mid_epoch(photos, loader):
    data = _data(photos, loader=loader)
    full = list(data.train.iterate(3))
    tail = list(data.train.iterate(3, start_step=2))
    assert len(tail) == len(full) - 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.image, b.image) and torch.equal(a.crop, b.crop) and torch.equal(a.index, b.index)


def _truncated(data: bytes) -> bytes:
    return data[:2000]


def _broken_huffman_table(data: bytes) -> bytes:
    """A complete file whose first Huffman table is overwritten: the header reads, the decoders fail."""
    at = data.index(b"\xff\xc4") + 5
    return data[:at] + b"\xff" * 20 + data[at + 20 :]


def _with_corrupt_file(photos, tmp_path, corrupt):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    victim = sorted((root / "train" / "coffee").glob("*.JPEG"))[0]
    victim.write_bytes(corrupt(victim.read_bytes()))
    return root, victim


@pytest.mark.parametrize("corrupt", [_truncated, _broken_huffman_table])
@pytest.mark.parametrize("loader", ["torch", "device", DALI])
def test_corrupt_jpeg_stops_or_is_skipped(photos, tmp_path, loader, corrupt):
    """Either kind of damage is found on every backend (nvJPEG and DALI would decode a truncated file with grey
    rows, so the workers check its end-of-image marker), named, and then stops the run or is the only image
    dropped; a DALI pipeline that failed is rebuilt and the rest of the batch decoded."""
    root, victim = _with_corrupt_file(photos, tmp_path, corrupt)
    stop = _data(root, loader=loader)
    with pytest.raises(UserInputError, match=f"cannot decode image {victim}"):
        list(stop.train.iterate(1))
    skip = _data(root, loader=loader, corrupt="skip")
    with pytest.warns(UserWarning, match="skipped: cannot decode image"):
        batches = list(skip.train.iterate(1))
    seen = torch.cat([b.index for b in batches]).tolist()
    bad_index = [i for i, (p, _) in enumerate(skip.train.samples) if p == victim]
    assert len(seen) == len(skip.train.samples) - 1 and bad_index[0] not in seen
    assert sorted(seen + bad_index) == list(range(len(skip.train.samples)))
    assert skip.train.epoch_stats() == {"data/skipped_images": 1.0}
    # The next epoch still decodes (a DALI pipeline is rebuilt after its error).
    assert len(torch.cat([b.index for b in skip.train.iterate(2)])) == len(skip.train.samples) - 1


def test_jpeg_end_marker_check():
    assert jpeg_is_complete(b"\xff\xd8\xff\xe0..\xff\xda scan \xff\xd9")
    assert not jpeg_is_complete(b"\xff\xd8\xff\xe0..\xff\xda scan, cut")
    # an EXIF thumbnail's end marker before the main image's scan does not count
    assert not jpeg_is_complete(b"\xff\xd8 exif \xff\xda thumb \xff\xd9 \xff\xda main scan, cut")
    assert jpeg_is_complete(b"\xff\xd8\xff\xda progressive 1 \xff\xda 2 \xff\xd9 trailing bytes")


def test_dali_not_installed_is_a_clear_error(photos, monkeypatch):
    monkeypatch.setattr(dali_augment, "pipeline_def", None)
    with pytest.raises(UserInputError, match=r"data.loader=dali needs NVIDIA DALI: pip install -e '.\[dali\]'"):
        _data(photos, loader="dali")


def test_empty_class_folder_is_refused(photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(UserInputError, match="class folder.*without images.*zebra"):
        _data(root)


def test_backend_errors(photos, tmp_path):
    with pytest.raises(UserInputError, match="data.loader must be"):
        config_from_dict({"data": {"loader": "nvjpeg"}})
    with pytest.raises(UserInputError, match="crop_scale"):
        config_from_dict({"data": {"crop_scale": [0.5, 0.1]}})
    tiny = tmp_path / "tiny"
    shutil.copytree(photos, tiny)
    cfg = config_from_dict({"data": {"dataset": "tiny_imagenet", "root": str(tiny), "loader": "device"}})
    with pytest.raises(UserInputError, match="data.loader=torch"):
        build_data(cfg.data, seed=0, device=torch.device("cpu"))
    # auto on a CPU: the worker pool (torch) decodes.
    auto = _data(photos, loader="auto")
    assert auto.train.device_augment is None


def test_crop_ranges_are_config_values(photos):
    """data.crop_scale / data.crop_ratio reach the draw: every crop of [0.5, 1] x [1, 1] covers at least half the
    image and is square (up to rounding), unless the 10 attempts fell back to the centre crop."""
    data = _data(photos, crop_scale=[0.5, 1.0], crop_ratio=[1.0, 1.0])
    for batch in data.train.iterate(1):
        for index, (top, left, h, w, _) in zip(batch.index.tolist(), batch.crop.tolist()):
            with Image.open(data.train.samples[index][0]) as img:
                width, height = img.size
            assert abs(h - w) <= 1 and h * w >= 0.5 * width * height - (h + w)
            assert 0 <= top <= height - h and 0 <= left <= width - w

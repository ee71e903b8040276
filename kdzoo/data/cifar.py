"""CIFAR-10/100 from torchvision's on-disk layout (``cifar-100-python/{train,test,meta}``).

Read with a restricted unpickler (never executes code from the file). The official md5 sums are
checked only as a warning: re-packaged copies (such as ../shared/data, whose ``filenames`` are
synthetic) hold the same pixels under other checksums, and torchvision's own class refuses them.
When the folder is missing and ``download`` is set, torchvision's downloader fetches the archive.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdzoo.data.safe_pickle import load_pickle
from kdzoo.errors import UserInputError

# The constants RepDistiller, mdistiller and SimKD normalise CIFAR-100 with (RepDistiller
# dataset/cifar100.py, mdistiller mdistiller/dataset/cifar100.py, SimKD dataset/cifar100.py): their published
# teachers were trained on inputs normalised this way, so evaluating them needs exactly these values.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    url: str
    archive: str
    archive_md5: str
    train_files: tuple[tuple[str, str], ...]
    test_files: tuple[tuple[str, str], ...]
    label_key: str
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar100": CifarLayout(
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        "fine_labels",
        100,
    ),
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        tuple(
            (f"data_batch_{i}", md5)
            for i, md5 in enumerate(
                [
                    "c99cafc152244af753f735de768cd75f",
                    "d4bba439e000b95fd0a9bffe97cbabec",
                    "54ebc095f3ab1f0389bbae665268c751",
                    "634d18415352ddfa80567beed471001a",
                    "482c414d41f54cd18b22e5b47cb7c3cb",
                ],
                start=1,
            )
        ),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        "labels",
        10,
    ),
}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(root: Path, layout: CifarLayout) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(layout.url, str(root), filename=layout.archive, md5=layout.archive_md5)
    except Exception as exc:  # network errors come in many types
        raise UserInputError(f"could not download {layout.url} into {root}: {exc}") from None


def load_cifar_split(
    root: str | Path, dataset: str, train: bool, *, download: bool = False, check_md5: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N]."""
    layout = CIFAR_LAYOUTS[dataset]
    root = Path(root)
    folder = root / layout.folder
    if not folder.is_dir():
        if not download:
            raise UserInputError(
                f"{dataset} not found: expected the folder {folder} (torchvision's layout). Point "
                "data.root at the folder that contains it, or set data.download=true."
            )
        _download(root, layout)
    images, labels = [], []
    for name, md5 in layout.train_files if train else layout.test_files:
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"{dataset} folder {folder} is incomplete: {name} is missing")
        if check_md5 and _md5(path) != md5:
            warnings.warn(f"{path} differs from the official file's md5 (re-packaged copy?)", stacklevel=2)
        entry = load_pickle(path)
        if not isinstance(entry, dict) or "data" not in entry or layout.label_key not in entry:
            raise UserInputError(f"{path} is not a CIFAR batch file (keys 'data' and {layout.label_key!r} expected)")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise UserInputError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
        targets = np.asarray(entry[layout.label_key], dtype=np.int64)
        if len(targets) != len(data):
            raise UserInputError(f"{path}: {len(data)} images but {len(targets)} labels")
        if len(targets) and (targets.min() < 0 or targets.max() >= layout.num_classes):
            raise UserInputError(f"{path}: labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(targets)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

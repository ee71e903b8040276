"""An ImageFolder of real JPEG photographs, built from the photos that ship inside scikit-image and scikit-learn.

Each class is one photograph (an astronaut, a cat, coffee, a rocket, the Hubble deep field, a retina, ...); its
images are random crops of it, resized to ImageNet-like sizes (shorter side 240-500 px, aspect 3:4 to 4:3) and
re-encoded as baseline JPEGs at quality 70-95, as ImageNet's files are. So the decoder, the crops and the
resampling meet real photographic content at real file sizes (upscaled CIFAR is not ImageNet-like) on a machine
without the dataset. A few images may be greyscale or CMYK, modes ImageNet itself contains.

Used by the ImageNet-loading benchmark (benchmarks/bench_imagenet_data.py) and the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_images


def _sklearn_photo(index: int) -> Callable[[], np.ndarray]:
    return lambda: load_sample_images().images[index]


# Colour photographs bundled with the packages (no download): name -> loader of an RGB uint8 array.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "hubble": skimage.data.hubble_deep_field,
    "ihc": skimage.data.immunohistochemistry,
    "retina": skimage.data.retina,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "china": _sklearn_photo(0),
    "flower": _sklearn_photo(1),
}


def photo_jpegs(photo: np.ndarray, count: int, rng: np.random.Generator, quality: tuple[int, int] = (70, 95)
                ) -> list[tuple[Image.Image, int]]:
    """``count`` (image, JPEG quality) pairs cut from ``photo``."""
    height, width = photo.shape[:2]
    out = []
    for _ in range(count):
        area = rng.uniform(0.3, 1.0) * height * width
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(width, round(np.sqrt(area * aspect))))
        h = int(min(height, round(np.sqrt(area / aspect))))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = Image.fromarray(photo[top : top + h, left : left + w])
        short = int(rng.integers(240, 501))
        scale = short / min(w, h)
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        out.append((crop, int(rng.integers(quality[0], quality[1] + 1))))
    return out


def build_photo_folder(root: str | Path, *, train_per_class: int = 20, val_per_class: int = 5,
                       classes: int | None = None, seed: int = 0, greyscale_every: int = 0,
                       cmyk_every: int = 0) -> Path:
    """``root/train/<photo>/NNNN.JPEG`` and ``root/val/<photo>/NNNN.JPEG``; returns ``root``.

    ``greyscale_every`` / ``cmyk_every`` = n: every n-th image is saved in that mode (0 = none). Deterministic
    for a seed; an existing complete folder is kept."""
    root = Path(root)
    names = list(PHOTOS)[: classes or len(PHOTOS)]
    marker = root / f".complete-{train_per_class}-{val_per_class}-{len(names)}-{seed}-{greyscale_every}-{cmyk_every}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    count = 0  # over all classes: every n-th image of the whole folder gets the odd mode
    for name in names:
        photo = PHOTOS[name]()
        images = photo_jpegs(photo, train_per_class + val_per_class, rng)
        for n, (img, quality) in enumerate(images):
            split, number = ("train", n) if n < train_per_class else ("val", n - train_per_class)
            directory = root / split / name
            directory.mkdir(parents=True, exist_ok=True)
            count += 1
            if greyscale_every and count % greyscale_every == 0:
                img = img.convert("L")
            elif cmyk_every and count % cmyk_every == 0:
                img = img.convert("CMYK")
            img.save(directory / f"{number:04d}.JPEG", quality=quality)
    marker.touch()
    return root

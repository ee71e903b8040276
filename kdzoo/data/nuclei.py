"""A real, tiny segmentation dataset for demos and tests: fluorescence nuclei, converted to the VOC layout.

The source is the 512x512 fluorescence image and its nucleus instance mask that the ``stardist`` wheel
bundles (``stardist/data/images/img2d.tif``, ``mask2d.tif``; a 2018 Data Science Bowl image, Caicedo et al.,
"Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl", Nature Methods 2019). The
files are located through the package metadata, without importing stardist (its import pulls csbdeep and
TensorFlow).

Semantic classes (the three-class nuclei formulation of Caicedo et al., "Evaluation of deep learning
strategies for nucleus segmentation in fluorescence images", Cytometry A 2019): 0 background, 1 nucleus
interior, 2 nucleus boundary. Boundary pixels are those with a 4-neighbour of another instance label
(background included), i.e. scikit-image's ``find_boundaries(mode="thick")``: a 2-pixel contour around each
nucleus, 1 px inside and 1 px outside, and 2 px (one per nucleus) where nuclei touch, which is what lets a
semantic model separate touching nuclei.

Split (no pixel is in both): training tiles are 128x128 at stride 64 inside the left 384 columns
(5 x 7 = 35 overlapping tiles); validation tiles are the four non-overlapping 128x128 tiles of the right 128
columns. The tiles are written once under ``<root>/nuclei-voc`` (JPEGImages, SegmentationClass palette PNGs,
ImageSets/Segmentation/{train,val}.txt), atomically, and then read by the ordinary VOC reader.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
from PIL import Image

from kdzoo.data.cache_dir import write_directory_once
from kdzoo.errors import UserInputError

try:  # optional: only this demo dataset needs it, and kdzoo must import without it
    import tifffile
except ImportError:  # pragma: no cover - exercised only where tifffile is absent
    tifffile = None

NUCLEI_NUM_CLASSES = 3
NUCLEI_DIRNAME = "nuclei-voc"
TILE = 128
TRAIN_STRIDE = 64
TRAIN_COLUMNS = 384  # training tiles lie in columns [0, 384), validation tiles in [384, 512)
_INSTALL_HINT = "the nuclei demo dataset needs the 'stardist' and 'tifffile' packages: pip install stardist tifffile"
# Black, green (interior), red (boundary); the rest of the 256-entry palette stays black.
_PALETTE = [0, 0, 0, 0, 200, 0, 220, 0, 0] + [0] * (256 * 3 - 9)


def nuclei_source_files() -> tuple[Path, Path]:
    """Paths of stardist's bundled ``img2d.tif`` and ``mask2d.tif``, found without importing stardist."""
    try:
        dist = importlib.metadata.distribution("stardist")
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(_INSTALL_HINT) from None
    paths = tuple(Path(str(dist.locate_file(f"stardist/data/images/{name}"))) for name in ("img2d.tif", "mask2d.tif"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserInputError(f"the installed stardist has no {', '.join(missing)}; reinstall it: "
                             "pip install --force-reinstall stardist tifffile")
    return paths  # type: ignore[return-value]


def percentile_to_uint8(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Percentile normalisation to [0, 255] (the 1 / 99.8 percentiles of csbdeep's ``normalize`` used
    throughout the stardist examples), clipped."""
    lo, hi = np.percentile(image, [low, high])
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def semantic_from_instances(instances: np.ndarray) -> np.ndarray:
    """Instance labels (0 = background) -> uint8 classes 0 background, 1 interior, 2 boundary.

    A pixel is boundary when one of its 4-neighbours carries a different instance label; the image border
    is replicated, so it creates no boundary."""
    labels = np.asarray(instances)
    padded = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    boundary = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        boundary |= padded[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w] != labels
    semantic = (labels > 0).astype(np.uint8)
    semantic[boundary] = 2
    return semantic


def nuclei_tiles() -> list[tuple[str, int, int]]:
    """(id, top, left) of every tile: train tiles first, then val tiles; ids sort in that order too."""
    train = [(f"train_y{y:03d}_x{x:03d}", y, x)
             for y in range(0, 512 - TILE + 1, TRAIN_STRIDE) for x in range(0, TRAIN_COLUMNS - TILE + 1, TRAIN_STRIDE)]
    val = [(f"val_y{y:03d}_x{x:03d}", y, x) for y in range(0, 512, TILE) for x in range(TRAIN_COLUMNS, 512, TILE)]
    return train + val


def _write_voc(out: Path, image: np.ndarray, semantic: np.ndarray) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for tile_id, y, x in nuclei_tiles():
        grey = image[y: y + TILE, x: x + TILE]
        Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(out / "JPEGImages" / f"{tile_id}.jpg",
                                                                     quality=95)
        mask = Image.fromarray(semantic[y: y + TILE, x: x + TILE])
        mask.putpalette(_PALETTE)  # turns the 'L' image into a 'P' one, as VOC's SegmentationClass PNGs
        mask.save(out / "SegmentationClass" / f"{tile_id}.png")
        splits[tile_id.split("_")[0]].append(tile_id)
    for split, ids in splits.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def prepare_nuclei_voc(root: str | Path) -> Path:
    """``<root>/nuclei-voc`` in the VOC 2012 layout, converted from stardist's files on first use.

    Written into a temporary sibling directory and renamed into place, so a present directory is complete
    (concurrent processes, e.g. DDP ranks, may race: the first rename wins, the others discard theirs)."""
    final = Path(root) / NUCLEI_DIRNAME
    marker = "ImageSets/Segmentation/val.txt"
    if (final / marker).is_file():
        return final
    image_path, mask_path = nuclei_source_files()
    if tifffile is None:
        raise UserInputError(_INSTALL_HINT)
    image, instances = tifffile.imread(image_path), tifffile.imread(mask_path)
    if image.shape != (512, 512) or instances.shape != (512, 512):
        raise UserInputError(f"{image_path} / {mask_path}: expected two 512x512 images, got {image.shape} and "
                             f"{instances.shape}")
    return write_directory_once(
        final, marker, lambda out: _write_voc(out, percentile_to_uint8(image), semantic_from_instances(instances)))

"""A real, small object-detection dataset for demos and tests: tree crowns in aerial RGB images, one class.

The source is the annotated imagery the ``deepforest`` wheel bundles (weecology/DeepForest, MIT licence;
NEON airborne orthophotos with hand-drawn crown boxes in Pascal VOC xml, Weinstein et al., "Individual
tree-crown detection in RGB imagery using semi-supervised deep learning neural networks", Remote Sensing
2019). The files are located through the package metadata without importing deepforest (its import needs
pytorch-lightning, transformers, rasterio, geopandas, ...; ``pip install --no-deps deepforest`` is enough):

==================================================  ==========  =====  ==================================
deepforest/data/<stem>.xml (+ the image it names)   size        boxes  tiles (train + val)
==================================================  ==========  =====  ==================================
2019_YELL_2_528000_4978000_image_crop2 (.png)       2299x2472   574    30 + 6 (val: the last tile row)
2019_YELL_2_541000_4977000_image_crop (.png)        1249x1035   279    6 + 3 (val: the last tile row)
OSBS_029 (.tif)                                     400x400     61     1 + 0
==================================================  ==========  =====  ==================================

(SOAP_061.xml is left out: its classes are "Alive" / "Dead", not "Tree".) Each image is cut into a grid of
400 px tiles starting at the top-left corner; a remainder strip of at least 200 px becomes a narrower tile,
a thinner one is dropped (YELL crop2: 299 px column kept, 72 px row dropped; YELL crop: 49 px column dropped,
235 px row kept). Tiles do not overlap, so no pixel is in both splits; validation is the bottom tile row of
each image with more than one row, which keeps it a spatially separate block. Boxes are clipped to their tile:
a box keeping at least half of its area is a normal object (``truncated`` when clipped); a box keeping less
than half is written as ``difficult``, so it is neither a training target nor, in the COCO evaluation, a
miss or a false positive (the tree is visible in the tile, but too little of it to demand a detection).

The tiles are written once under ``<root>/trees-voc`` (JPEGImages/*.jpg, Annotations/*.xml with the class
``tree``, ImageSets/Main/{train,val}.txt), atomically, and then read by the ordinary VOC detection reader.
"""

from __future__ import annotations

import importlib.metadata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdzoo.data.cache_dir import write_directory_once
from kdzoo.errors import UserInputError

TREES_DIRNAME = "trees-voc"
TREES_CLASS = "tree"
SOURCE_CLASS = "Tree"
TREES_SOURCES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop", "OSBS_029")
TILE = 400
MIN_TILE = 200  # a remainder strip narrower than this is dropped
MIN_VISIBLE = 0.5  # a clipped box keeping less of its area than this is marked difficult
_INSTALL_HINT = ("the trees demo dataset needs the files of the 'deepforest' package: pip install --no-deps "
                 "deepforest (kdzoo reads its bundled images and xml files without importing it)")


@dataclass(frozen=True)
class TileBox:
    """A box of a tile in continuous pixel coordinates (x0, y0, x1, y1), with its VOC flags."""

    x0: float
    y0: float
    x1: float
    y1: float
    truncated: bool
    difficult: bool


def trees_source_dir() -> Path:
    """``deepforest/data`` of the installed deepforest distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution("deepforest")
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(_INSTALL_HINT) from None
    data = Path(str(dist.locate_file("deepforest/data")))
    missing = [s for s in TREES_SOURCES if not (data / f"{s}.xml").is_file()]
    if missing:
        raise UserInputError(f"the installed deepforest has no {', '.join(f'{m}.xml' for m in missing)} in {data}; "
                             "reinstall it: pip install --no-deps --force-reinstall deepforest")
    return data


def axis_tiles(length: int, tile: int = TILE, min_tile: int = MIN_TILE) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis: full tiles from 0, then the remainder if >= ``min_tile``."""
    out = [(s, tile) for s in range(0, length - tile + 1, tile)]
    rest = length - len(out) * tile
    if rest >= min_tile:
        out.append((len(out) * tile, rest))
    return out


def read_source_boxes(xml_path: Path) -> tuple[str, tuple[int, int], np.ndarray]:
    """(image file name, recorded (width, height), [N, 4] continuous xyxy boxes) of a deepforest xml file.
    Its coordinates are VOC's 1-based inclusive pixel indices (they run from 1 to the image size), hence
    ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2 ``data/datasets/pascal_voc.py``)."""
    root = ET.parse(xml_path).getroot()
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name", "").strip() != SOURCE_CLASS:
            raise UserInputError(f"{xml_path}: expected only {SOURCE_CLASS!r} objects, found "
                                 f"{obj.findtext('name')!r}")
        b = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append([b[0] - 1.0, b[1] - 1.0, b[2], b[3]])
    return root.findtext("filename", "").strip(), size, np.array(boxes, dtype=np.float64).reshape(-1, 4)


def clip_to_tile(boxes: np.ndarray, left: int, top: int, width: int, height: int,
                 min_visible: float = MIN_VISIBLE) -> list[TileBox]:
    """The boxes overlapping a tile, in tile coordinates, clipped to it and flagged (see the module doc)."""
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx0, cy0 = max(x0, left), max(y0, top)
        cx1, cy1 = min(x1, left + width), min(y1, top + height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        visible = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
        clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
        out.append(TileBox(cx0 - left, cy0 - top, cx1 - left, cy1 - top, clipped, visible < min_visible))
    return out


def _tile_xml(tile_id: str, width: int, height: int, boxes: list[TileBox]) -> ET.ElementTree:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = TREES_DIRNAME
    ET.SubElement(ann, "filename").text = f"{tile_id}.jpg"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "0"
    for b in boxes:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = TREES_CLASS
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(b.truncated))
        ET.SubElement(obj, "difficult").text = str(int(b.difficult))
        bnd = ET.SubElement(obj, "bndbox")
        # back to VOC's 1-based inclusive indices; the source coordinates are whole pixels, so these are too
        for tag, v in (("xmin", b.x0 + 1), ("ymin", b.y0 + 1), ("xmax", b.x1), ("ymax", b.y1)):
            ET.SubElement(bnd, tag).text = f"{v:g}"
    tree = ET.ElementTree(ann)
    ET.indent(tree)
    return tree


def trees_tiles(source: Path) -> list[tuple[str, str, Image.Image, list[TileBox]]]:
    """(split, tile id, tile image, boxes) of every tile of the source images, in source then raster order."""
    out = []
    for stem in TREES_SOURCES:
        file_name, (width, height), boxes = read_source_boxes(source / f"{stem}.xml")
        with Image.open(source / file_name) as img:
            image = img.convert("RGB")
        if image.size != (width, height):
            raise UserInputError(f"{source / file_name} is {image.width}x{image.height} but {stem}.xml records "
                                 f"{width}x{height}")
        rows, cols = axis_tiles(height), axis_tiles(width)
        for r, (top, th) in enumerate(rows):
            split = "val" if len(rows) > 1 and r == len(rows) - 1 else "train"
            for left, tw in cols:
                tile_id = f"{stem}_y{top:04d}_x{left:04d}"
                out.append((split, tile_id, image.crop((left, top, left + tw, top + th)),
                            clip_to_tile(boxes, left, top, tw, th)))
    return out


def _write_voc(out: Path, source: Path) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, tile_id, image, boxes in trees_tiles(source):
        image.save(out / "JPEGImages" / f"{tile_id}.jpg", quality=95)
        _tile_xml(tile_id, image.width, image.height, boxes).write(out / "Annotations" / f"{tile_id}.xml")
        splits[split].append(tile_id)
    for split, ids in splits.items():
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "SOURCE.txt").write_text(
        "Tiles of the annotated NEON aerial images bundled with the deepforest package (weecology/DeepForest, "
        f"MIT licence): {', '.join(TREES_SOURCES)}. Written by kdzoo.data.trees.\n")


def prepare_trees_voc(root: str | Path) -> Path:
    """``<root>/trees-voc`` in the VOC detection layout, converted from deepforest's files on first use.

    Written into a temporary sibling directory and renamed into place, so a present directory is complete
    (concurrent processes, e.g. DDP ranks, may race: the first rename wins, the others discard theirs)."""
    final = Path(root) / TREES_DIRNAME
    marker = "ImageSets/Main/val.txt"
    if (final / marker).is_file():
        return final
    source = trees_source_dir()
    return write_directory_once(final, marker, lambda out: _write_voc(out, source))

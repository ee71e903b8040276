"""Paired image / mask transforms for semantic segmentation, on PIL images, drawn from a per-sample RNG.

The recipe is pytorch-deeplab-xception's, which overhaul-distillation reuses unchanged
(clovaai/overhaul-distillation ``Segmentation/dataloaders/custom_transforms.py`` and ``datasets/pascal.py``):
training = RandomHorizontalFlip -> RandomScaleCrop(base_size, crop_size) -> RandomGaussianBlur, evaluation =
FixedResize(crop_size) (the short side to ``crop_size``, whole image). Each transform takes a
``random.Random`` instead of the global ``random`` module, so a sample's view is a pure function of the seed
the caller gives that RNG; the draws happen in the same order as the reference's global-RNG calls.

Images stay uint8 RGB and masks stay class indices ('L', or 'I' when a value exceeds 255): normalisation is
done later, batched, on the training device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

BILINEAR, NEAREST = Image.Resampling.BILINEAR, Image.Resampling.NEAREST


def mask_image(mask: np.ndarray, fill: int) -> Image.Image:
    """Class-index array -> PIL image that NEAREST resizing, flips, crops and padding keep exact."""
    if mask.size and int(mask.max()) <= 255 and 0 <= fill <= 255 and int(mask.min()) >= 0:
        return Image.fromarray(mask.astype(np.uint8))  # mode 'L'
    return Image.fromarray(mask.astype(np.int32))  # mode 'I'


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``short``; the long side is truncated, as in
    torchvision's ``Resize(int)`` (``_compute_resized_output_size``), which the reference's FixedResize uses."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def pad_bottom_right(img: Image.Image, width: int, height: int, fill: int) -> Image.Image:
    """Grow ``img`` to at least (width, height) by padding on the right and bottom (ImageOps.expand with a
    (0, 0, padw, padh) border in the reference)."""
    w, h = img.size
    if w >= width and h >= height:
        return img
    out = Image.new(img.mode, (max(w, width), max(h, height)), fill if img.mode != "RGB" else (fill,) * 3)
    out.paste(img, (0, 0))
    return out


def random_hflip(img: Image.Image, mask: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    if rng.random() < 0.5:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img, mask


def random_scale_crop(img: Image.Image, mask: Image.Image, rng: random.Random, base_size: int, crop_size: int,
                      mask_fill: int) -> tuple[Image.Image, Image.Image]:
    """Short side drawn uniformly from [0.5, 2.0] x base_size, pad to crop_size if smaller, random crop.

    The image is padded with 0 (black, before normalisation, as the reference) and the mask with
    ``mask_fill`` (the ignore index), so padding is excluded from the loss. pytorch-deeplab-xception's
    RandomScaleCrop defaults to ``fill=0`` and its VOC dataset does not override it, so its padding is
    scored as background; its Cityscapes dataset passes ``fill=255``, which is what kdzoo does everywhere.
    """
    short = rng.randint(int(base_size * 0.5), int(base_size * 2.0))
    w, h = img.size
    if h > w:
        ow, oh = short, int(1.0 * h * short / w)
    else:
        ow, oh = int(1.0 * w * short / h), short
    img, mask = img.resize((ow, oh), BILINEAR), mask.resize((ow, oh), NEAREST)
    if short < crop_size:
        img = pad_bottom_right(img, crop_size, crop_size, 0)
        mask = pad_bottom_right(mask, crop_size, crop_size, mask_fill)
    w, h = img.size
    x1, y1 = rng.randint(0, w - crop_size), rng.randint(0, h - crop_size)
    box = (x1, y1, x1 + crop_size, y1 + crop_size)
    return img.crop(box), mask.crop(box)


def random_gaussian_blur(img: Image.Image, rng: random.Random) -> Image.Image:
    """With probability 0.5, a PIL Gaussian blur of radius U(0, 1) on the image only."""
    if rng.random() < 0.5:
        return img.filter(ImageFilter.GaussianBlur(radius=rng.random()))
    return img


@dataclass(frozen=True)
class TrainTransform:
    """The reference's training pipeline: flip, random scale + crop, blur (in that order)."""

    base_size: int
    crop_size: int
    mask_fill: int = 255

    def __call__(self, img: Image.Image, mask: Image.Image,
                 rng: random.Random) -> tuple[Image.Image, Image.Image]:
        img, mask = random_hflip(img, mask, rng)
        img, mask = random_scale_crop(img, mask, rng, self.base_size, self.crop_size, self.mask_fill)
        return random_gaussian_blur(img, rng), mask


@dataclass(frozen=True)
class FixScaleCrop:
    """Deterministic training view (``data.augment: false``): short side to crop_size, centre crop to a square
    so batches stack (the reference's FixScaleCrop)."""

    crop_size: int

    def __call__(self, img: Image.Image, mask: Image.Image,
                 rng: random.Random) -> tuple[Image.Image, Image.Image]:
        ow, oh = short_side_size(*img.size, self.crop_size)
        img, mask = img.resize((ow, oh), BILINEAR), mask.resize((ow, oh), NEAREST)
        x1, y1 = int(round((ow - self.crop_size) / 2.0)), int(round((oh - self.crop_size) / 2.0))
        box = (x1, y1, x1 + self.crop_size, y1 + self.crop_size)
        return img.crop(box), mask.crop(box)


@dataclass(frozen=True)
class FixedResize:
    """Evaluation view: the short side to ``size`` (bilinear image, nearest mask), the whole image kept."""

    size: int

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return short_side_size(width, height, self.size)

    def __call__(self, img: Image.Image, mask: Image.Image,
                 rng: random.Random) -> tuple[Image.Image, Image.Image]:
        size = self.output_size(*img.size)
        if size == img.size:  # torchvision's Resize returns the image untouched in this case
            return img, mask
        return img.resize(size, BILINEAR), mask.resize(size, NEAREST)

"""ImageNet-style augmentation as explicit parameters: RandomResizedCrop + horizontal flip drawn per sample as
(top, left, height, width, flip), then applied by whichever backend decodes the image (PIL in workers, batched
tensors on the device, DALI). The same parameters give the same crop on every backend, a crop-level teacher cache
(FKD) can store and replay them, and a sample's parameters depend only on (seed, epoch, index), so they survive
resumption and do not depend on the worker that decodes the sample.

The draw is torchvision's ``RandomResizedCrop.get_params`` followed by ``RandomHorizontalFlip``: the same random
numbers in the same order, so under the same seed the crops equal torchvision's. (DALI's own
``decoders.image_random_crop`` samples area and aspect in a different way; kdzoo feeds DALI these parameters
instead, docs/config.md, ImageNet loading.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

# A crop-parameter row (Batch.crop of a class-folder batch, the cache's params table) is (top, left, height,
# width, flip); NO_CROP marks a sample whose augmentation has none (evaluation, Tiny-ImageNet).
NO_CROP = (-1, -1, -1, -1, 0)

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class ResizedCropSpec:
    """Everything a crop's pixels depend on besides the image and its parameters."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip: bool = True

    def as_dict(self) -> dict:
        out = asdict(self)
        out["scale"] = [round(float(v), 6) for v in self.scale]
        out["ratio"] = [round(float(v), 6) for v in self.ratio]
        return out


def draw_crop(width: int, height: int, spec: ResizedCropSpec, generator: torch.Generator) -> tuple[int, ...]:
    """(top, left, height, width, flip) for an image of ``width`` x ``height``: torchvision's RandomResizedCrop
    parameters (10 attempts, then the central crop clamped to the ratio range) and a fair coin for the flip."""
    area = height * width
    log_ratio = torch.log(torch.tensor(spec.ratio))
    crop: tuple[int, int, int, int] | None = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(spec.scale[0], spec.scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            crop = (top, left, h, w)
            break
    if crop is None:
        in_ratio = width / height
        if in_ratio < min(spec.ratio):
            w, h = width, int(round(width / min(spec.ratio)))
        elif in_ratio > max(spec.ratio):
            w, h = int(round(height * max(spec.ratio))), height
        else:
            w, h = width, height
        crop = ((height - h) // 2, (width - w) // 2, h, w)
    flip = int(spec.flip and bool(torch.rand(1, generator=generator) < 0.5))
    return (*crop, flip)


def crop_pil(img: Image.Image, params: Sequence[int], spec: ResizedCropSpec) -> Image.Image:
    """The crop on a PIL image (torchvision's resized_crop + hflip: PIL's antialiased resampling)."""
    top, left, h, w, flip = (int(v) for v in params)
    out = TF.resized_crop(img, top, left, h, w, [spec.size, spec.size], INTERPOLATIONS[spec.interpolation])
    return TF.hflip(out) if flip else out


def crop_tensors(images: Sequence[Tensor], params: Tensor, spec: ResizedCropSpec) -> Tensor:
    """The crops of decoded uint8 [3, H, W] images on their device -> uint8 [B, 3, size, size].

    Antialiased resampling (``F.interpolate(antialias=True)``, which torchvision documents as close to PIL's)
    rounded back to uint8 as PIL's output is, so both backends feed the same value grid to the normalisation."""
    out = torch.empty((len(images), 3, spec.size, spec.size), dtype=torch.uint8, device=images[0].device)
    rows = params.tolist()
    for i, (img, (top, left, h, w, flip)) in enumerate(zip(images, rows)):
        region = img[:, top : top + h, left : left + w].unsqueeze(0).float()
        resized = F.interpolate(region, size=(spec.size, spec.size), mode=spec.interpolation, antialias=True,
                                align_corners=False)
        resized = resized.round_().clamp_(0, 255)[0]
        out[i] = resized.flip(-1) if flip else resized
    return out


def resize_centre_crop_tensors(images: Sequence[Tensor], resize: int, size: int, interpolation: str) -> Tensor:
    """Evaluation on decoded uint8 images: shorter side to ``resize`` (torchvision's Resize(int) rule), then the
    central ``size`` x ``size`` crop (CenterCrop's offsets) -> uint8 [B, 3, size, size]."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    for i, img in enumerate(images):
        new_h, new_w, top, left = resize_centre_crop_geometry(*img.shape[-2:], resize, size)
        resized = F.interpolate(img.unsqueeze(0).float(), size=(new_h, new_w), mode=interpolation, antialias=True,
                                align_corners=False).round_().clamp_(0, 255)[0]
        out[i] = resized[:, top : top + size, left : left + size]
    return out


def resize_centre_crop_geometry(height: int, width: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's ``Resize(resize)`` (shorter side to ``resize``, the longer one truncated) then
    ``CenterCrop(size)`` on a ``height`` x ``width`` image: (resized height, resized width, crop top, crop left)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))

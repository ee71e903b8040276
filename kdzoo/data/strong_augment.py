"""The strongly augmented view, batched on the device: FixMatch-style RandAugment + Cutout on uint8 images.

This is the ``RandAugment(2, 10)`` of Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/dataset/cifar100.py``
(MLKD's strong view, after its own RandomCrop(32, 4) and flip; docs/methods/mlkd.md): each image gets ``num_ops``
operations drawn with replacement from fourteen, each with a magnitude drawn uniformly from the operation's range,
then a Cutout of a random size. That implementation runs PIL per image; here every operation follows the PIL
function it calls (``ImageOps``, ``ImageEnhance``, ``Image.transform`` with nearest resampling), with per-sample
parameters, as three batched steps per operation slot: a per-channel lookup table (AutoContrast, Equalize,
Posterize, Solarize), a blend with a degenerate image (Brightness, Color, Contrast, Sharpness) and a nearest-
neighbour affine resampling (Rotate, ShearX/Y, TranslateX/Y). Samples whose operation belongs to another step get
the identity there, so no step needs a host synchronisation.

Every random number is drawn up front (:meth:`RandAugmentCutout.draw`), so a loader's epoch plan holds them and a
resumed epoch redraws the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# (name, low, high) in the reference's ``augment_list()`` order; a magnitude is low + (high - low) * U[0, 1).
RANDAUGMENT_OPS: tuple[tuple[str, float, float], ...] = (
    ("auto_contrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
OP_INDEX = {name: i for i, (name, _, _) in enumerate(RANDAUGMENT_OPS)}


@dataclass(frozen=True)
class RandAugmentCutout:
    """``num_ops`` RandAugment operations, then Cutout of a square side ``U[0, max_cutout) * width`` filled with
    ``cutout_fill`` (the reference: ``RandAugment(2, 10)``, whose magnitude 10 its implementation ignores,
    ``Cutout(img, random() * 0.5)`` and ``CutoutAbs``'s colour (125, 123, 114))."""

    num_ops: int = 2
    max_cutout: float = 0.5
    cutout_fill: tuple[int, int, int] = (125, 123, 114)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Every random number of ``n`` views: operation indices and magnitudes ``[n, num_ops]``, Cutout size
        fraction and the two uniforms that place it ``[n]``."""
        ops = torch.randint(0, len(RANDAUGMENT_OPS), (n, self.num_ops), generator=generator)
        low = torch.tensor([lo for _, lo, _ in RANDAUGMENT_OPS])[ops]
        high = torch.tensor([hi for _, _, hi in RANDAUGMENT_OPS])[ops]
        magnitude = low + (high - low) * torch.rand(n, self.num_ops, generator=generator)
        cutout = torch.rand(n, generator=generator) * self.max_cutout
        cutout_xy = torch.rand(n, 2, generator=generator)
        return {"ops": ops, "magnitude": magnitude, "cutout": cutout, "cutout_xy": cutout_xy}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``images``: uint8 ``[B, 3, H, W]``; ``params``: :meth:`draw`'s tensors for these B views."""
        for slot in range(self.num_ops):
            op, value = params["ops"][:, slot], params["magnitude"][:, slot]
            images = apply_lut(images, lut_for(images, op, value))
            images = blend_op(images, op, value)
            images = affine_nearest(images, affine_for(op, value, images.shape[-1], images.shape[-2]))
        return cutout(images, params["cutout"], params["cutout_xy"], self.cutout_fill)


def _is(op: Tensor, name: str) -> Tensor:
    return op == OP_INDEX[name]


def lut_for(images: Tensor, op: Tensor, value: Tensor) -> Tensor:
    """Per-sample, per-channel lookup tables ``[B, C, 256]`` (int64): identity except where the sample's
    operation is one of PIL's ``ImageOps`` point operations."""
    b, c = images.shape[:2]
    levels = torch.arange(256, device=images.device).expand(b, c, 256)
    lut = levels
    # ImageOps.posterize(img, max(1, int(v))): keep the top `bits` bits.
    bits = value.clamp(min=1).floor().long().clamp(max=8)
    keep = (255 - ((1 << (8 - bits)) - 1))[:, None, None]
    lut = torch.where(_is(op, "posterize")[:, None, None], levels & keep, lut)
    # ImageOps.solarize(img, v): levels at or above the threshold are inverted.
    solarized = torch.where(levels < value.to(images.device)[:, None, None], levels, 255 - levels)
    lut = torch.where(_is(op, "solarize")[:, None, None], solarized, lut)
    lut = torch.where(_is(op, "auto_contrast")[:, None, None], autocontrast_lut(images), lut)
    return torch.where(_is(op, "equalize")[:, None, None], equalize_lut(images), lut)


def autocontrast_lut(images: Tensor) -> Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, ``int(i * scale + offset)`` with scale = 255 / (hi - lo) and
    offset = -lo * scale, clipped to 0..255; the identity where a channel is constant."""
    flat = images.flatten(2)
    lo, hi = flat.amin(dim=2).double(), flat.amax(dim=2).double()
    # A tensor division, not ``255.0 / tensor``: torch computes that as 255 * (1 / x), which rounds differently.
    scale = torch.full_like(lo, 255.0).div(hi - lo).where(hi > lo, 1.0)
    levels = torch.arange(256, device=images.device, dtype=torch.float64)
    mapped = (levels * scale[..., None] + (-lo * scale)[..., None]).floor().clamp(0, 255).long()
    return torch.where((hi > lo)[..., None], mapped, levels.long())


def equalize_lut(images: Tensor) -> Tensor:
    """ImageOps.equalize: per channel, step = (pixels - count of the highest level present) // 255 and
    lut[i] = (step // 2 + pixels below level i) // step; the identity where step is 0."""
    b, c = images.shape[:2]
    flat = images.flatten(2).long()
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=images.device).scatter_add_(2, flat, torch.ones_like(flat))
    top_count = hist.gather(2, flat.amax(dim=2, keepdim=True)).squeeze(2)
    step = (flat.shape[2] - top_count) // 255
    below = hist.cumsum(2) - hist
    safe_step = step.clamp(min=1)[..., None]
    mapped = ((safe_step // 2 + below) // safe_step).clamp(max=255)
    return torch.where((step > 0)[..., None], mapped, torch.arange(256, device=images.device).expand(b, c, 256))


def apply_lut(images: Tensor, lut: Tensor) -> Tensor:
    b, c, h, w = images.shape
    return lut.gather(2, images.flatten(2).long()).view(b, c, h, w).to(torch.uint8)


def grayscale(images: Tensor) -> Tensor:
    """PIL's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, ``[B, 1, H, W]`` int64."""
    r, g, b = images.long().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16)[:, None]


def smoothed(images: Tensor) -> Tensor:
    """ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divisor 13), the border pixels kept as they are, as
    PIL's 3x3 filter leaves them; the filtered value is rounded to the nearest level."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13.0
    c = images.shape[1]
    filtered = F.conv2d(images.float(), kernel.expand(c, 1, 3, 3), groups=c)
    out = images.float().clone()
    out[:, :, 1:-1, 1:-1] = (filtered + 0.5).floor().clamp(0, 255)
    return out


def blend_op(images: Tensor, op: Tensor, value: Tensor) -> Tensor:
    """ImageEnhance's ``Image.blend(degenerate, image, v)``, truncated to a level as PIL's blend does:
    Brightness blends with black, Color with the L image, Contrast with the L image's rounded mean level,
    Sharpness with the SMOOTH-filtered image. Samples with another operation keep their pixels (factor 1)."""
    b = images.shape[0]
    pixels = images.float()
    gray = grayscale(images)
    mean = (2 * gray.flatten(1).sum(1) + gray[0].numel()) // (2 * gray[0].numel())  # int(mean + 0.5), exactly
    degenerate = torch.zeros_like(pixels)
    for name, candidate in (("color", gray.float().expand_as(pixels)),
                            ("contrast", mean.float().view(b, 1, 1, 1).expand_as(pixels)),
                            ("sharpness", smoothed(images))):
        degenerate = torch.where(_is(op, name).view(b, 1, 1, 1), candidate, degenerate)
    is_blend = _is(op, "brightness") | _is(op, "color") | _is(op, "contrast") | _is(op, "sharpness")
    factor = torch.where(is_blend, value.to(pixels.device), 1.0).float().view(b, 1, 1, 1)
    return (degenerate + factor * (pixels - degenerate)).clamp(0, 255).floor().to(torch.uint8)


def affine_for(op: Tensor, value: Tensor, width: int, height: int) -> Tensor:
    """PIL ``Image.transform(AFFINE)`` coefficients ``[B, 2, 3]`` (output pixel centre -> input position) of the
    geometric operations, the identity for the others. ShearX/Y: (1, v, 0, 0, 1, 0) / (1, 0, 0, v, 1, 0);
    TranslateX/Y: (1, 0, v*W, 0, 1, 0) / (1, 0, 0, 0, 1, v*H); Rotate: ``Image.rotate(v)`` about the centre."""
    value = value.double()
    b = op.shape[0]
    matrix = torch.zeros(b, 2, 3, dtype=torch.float64, device=op.device)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
    matrix[:, 0, 1] = torch.where(_is(op, "shear_x"), value, 0.0)
    matrix[:, 1, 0] = torch.where(_is(op, "shear_y"), value, 0.0)
    matrix[:, 0, 2] = torch.where(_is(op, "translate_x"), value * width, 0.0)
    matrix[:, 1, 2] = torch.where(_is(op, "translate_y"), value * height, 0.0)
    # Image.rotate: angle = -radians(v % 360), (cos, sin, ., -sin, cos, .), each rounded to 15 decimals, then the
    # translation that keeps (W/2, H/2) in place.
    angle = -torch.deg2rad(torch.remainder(value, 360.0))
    cos, sin = _round15(torch.cos(angle)), _round15(torch.sin(angle))
    cx, cy = width / 2.0, height / 2.0
    rotation = torch.stack([
        torch.stack([cos, sin, cos * -cx + sin * -cy + cx], dim=1),
        torch.stack([-sin, cos, -sin * -cx + cos * -cy + cy], dim=1),
    ], dim=1)
    return torch.where(_is(op, "rotate").view(b, 1, 1), rotation, matrix)


def _round15(values: Tensor) -> Tensor:
    return torch.round(values, decimals=15)


def affine_nearest(images: Tensor, matrix: Tensor) -> Tensor:
    """Nearest-neighbour resampling as PIL's ``ImagingTransformAffine``: output pixel (x, y) reads input pixel
    (floor(a(x+.5) + b(y+.5) + c), floor(d(x+.5) + e(y+.5) + f)); positions outside the image give 0. PIL takes
    two paths, both followed here: a pure shift (b = d = 0: identity, TranslateX/Y) in floating point
    (``ImagingScaleAffine``), anything else in 16.16 fixed point (``affine_fixed``: each coefficient rounded to
    1/65536, the half-pixel offset folded into c and f first), which decides the pixels near a boundary."""
    b, c, h, w = images.shape
    matrix = matrix.to(images.device)
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float64),
                            torch.arange(w, device=images.device, dtype=torch.float64), indexing="ij")
    xs, ys = xs.reshape(1, 1, h * w), ys.reshape(1, 1, h * w)

    def apply(coefficients: Tensor, x: Tensor, y: Tensor) -> Tensor:  # elementwise: CUDA has no int64 matmul
        return coefficients[:, :, 0:1] * x + coefficients[:, :, 1:2] * y + coefficients[:, :, 2:3]

    floating = apply(matrix, xs + 0.5, ys + 0.5).floor().long()  # [B, 2, H*W]: input x, input y
    # affine_fixed: FIX(v) = floor(v * 65536 + 0.5); offsets c + a/2 + b/2 and f + d/2 + e/2; input = value >> 16.
    fixed_point = (matrix * 65536.0 + 0.5).floor().long()
    offsets = matrix[:, :, 2] + matrix[:, :, 0] * 0.5 + matrix[:, :, 1] * 0.5
    fixed_point[:, :, 2] = (offsets * 65536.0 + 0.5).floor().long()
    fixed = torch.div(apply(fixed_point, xs.long(), ys.long()), 65536, rounding_mode="floor")
    shift_only = (matrix[:, 0, 1] == 0) & (matrix[:, 1, 0] == 0)
    source = torch.where(shift_only[:, None, None], floating, fixed)
    inside = (source[:, 0] >= 0) & (source[:, 0] < w) & (source[:, 1] >= 0) & (source[:, 1] < h)
    flat_index = (source[:, 1].clamp(0, h - 1) * w + source[:, 0].clamp(0, w - 1))[:, None].expand(b, c, h * w)
    picked = images.flatten(2).gather(2, flat_index)
    return torch.where(inside[:, None], picked, 0).view(b, c, h, w).to(torch.uint8)


def cutout(images: Tensor, size_fraction: Tensor, placement: Tensor, fill: tuple[int, ...]) -> Tensor:
    """The reference's ``Cutout`` / ``CutoutAbs``: side v = fraction * W (none when v is 0);
    x0 = ``np.random.uniform(W)``, which draws from (1, W] (its ``low`` is W, ``high`` 1), likewise y0; then
    x0 = int(max(0, x0 - v/2)), x1 = min(W, x0 + v), and ``ImageDraw.rectangle`` fills columns x0..int(x1) and
    rows y0..int(y1), both ends included."""
    b, c, h, w = images.shape
    device = images.device
    side = size_fraction.double().to(device) * w
    centre_x = w + (1.0 - w) * placement[:, 0].double().to(device)
    centre_y = h + (1.0 - h) * placement[:, 1].double().to(device)
    x0 = (centre_x - side / 2).clamp(min=0).floor()
    y0 = (centre_y - side / 2).clamp(min=0).floor()
    x1 = torch.minimum(torch.full_like(x0, w), x0 + side).floor()
    y1 = torch.minimum(torch.full_like(y0, h), y0 + side).floor()
    cols = torch.arange(w, device=device, dtype=torch.float64)
    rows = torch.arange(h, device=device, dtype=torch.float64)
    in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])
    in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])
    box = (in_y[:, :, None] & in_x[:, None, :] & (side > 0)[:, None, None])[:, None]
    colour = torch.tensor(fill, dtype=torch.uint8, device=device).view(1, c, 1, 1)
    return torch.where(box, colour, images)


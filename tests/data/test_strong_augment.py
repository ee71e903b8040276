"""The batched strong view (kdzoo/data/strong_augment.py) against PIL, image by image: every RandAugment operation
and Cutout as the MLKD reference applies them (Jin-Ying/Multi-Level-Logit-Distillation
``mdistiller/dataset/cifar100.py``: PIL ``ImageOps`` / ``ImageEnhance`` / ``Image.transform`` calls with the
magnitude drawn for the image), then the loader's second view, its plan and its resume."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdzoo.data.cifar import CIFAR100_MEAN, CIFAR100_STD, load_cifar_split
from kdzoo.data.datasets import build_data
from kdzoo.data.strong_augment import OP_INDEX, RANDAUGMENT_OPS, RandAugmentCutout, cutout
from kdzoo.data.tensor_loader import CropFlip, TensorBatchLoader
from kdzoo.errors import UserInputError

FILL = (125, 123, 114)


def pil_op(image: Image.Image, name: str, v: float) -> Image.Image:
    """The reference's operation ``name`` with magnitude ``v``, written with PIL's API."""
    w, h = image.size
    return {
        "auto_contrast": lambda: ImageOps.autocontrast(image),
        "brightness": lambda: ImageEnhance.Brightness(image).enhance(v),
        "color": lambda: ImageEnhance.Color(image).enhance(v),
        "contrast": lambda: ImageEnhance.Contrast(image).enhance(v),
        "equalize": lambda: ImageOps.equalize(image),
        "identity": lambda: image,
        "posterize": lambda: ImageOps.posterize(image, max(1, int(v))),
        "rotate": lambda: image.rotate(v),
        "sharpness": lambda: ImageEnhance.Sharpness(image).enhance(v),
        "shear_x": lambda: image.transform(image.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda: image.transform(image.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "solarize": lambda: ImageOps.solarize(image, v),
        "translate_x": lambda: image.transform(image.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "translate_y": lambda: image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h)),
    }[name]()


def pil_cutout(image: Image.Image, fraction: float, u_x: float, u_y: float) -> Image.Image:
    """Cutout(img, fraction): side fraction * W; the corner from np.random.uniform(W) = W + (1 - W) * u."""
    if fraction <= 0:
        return image
    w, h = image.size
    v = fraction * w
    x0, y0 = w + (1 - w) * u_x, h + (1 - h) * u_y
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), FILL)
    return image


def to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def images(data_root) -> torch.Tensor:
    """12 real CIFAR-100 test images, two constant-channel ones and two of uniform noise."""
    real, _ = load_cifar_split(data_root, "cifar100", train=False)
    flat = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    flat[0] = 77
    flat[1, 0], flat[1, 1], flat[1, 2] = 0, 128, 255
    noise = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.cat([real[:12], flat, noise])


@pytest.mark.parametrize("name", [name for name, _, _ in RANDAUGMENT_OPS])
def test_every_operation_equals_pil_exactly(images, name):
    _, low, high = RANDAUGMENT_OPS[OP_INDEX[name]]
    n = images.shape[0]
    magnitude = (low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(OP_INDEX[name])))
    params = {"ops": torch.full((n, 1), OP_INDEX[name]), "magnitude": magnitude[:, None],
              "cutout": torch.zeros(n), "cutout_xy": torch.zeros(n, 2)}
    out = RandAugmentCutout(num_ops=1).apply(images, params)
    for i in range(n):
        expected = to_tensor(pil_op(to_pil(images[i]), name, float(magnitude[i])))
        assert torch.equal(out[i], expected), (name, i, int((out[i].int() - expected.int()).abs().max()))


def test_cutout_equals_pil_rectangle(images):
    gen = torch.Generator().manual_seed(1)
    n = images.shape[0]
    fraction = torch.rand(n, generator=gen) * 0.5
    fraction[0] = 0.0  # no Cutout
    fraction[1] = 0.01  # below one pixel: the rectangle still fills one
    placement = torch.rand(n, 2, generator=gen)
    out = cutout(images, fraction, placement, FILL)
    for i in range(n):
        expected = pil_cutout(to_pil(images[i]), float(fraction[i]), float(placement[i, 0]), float(placement[i, 1]))
        assert torch.equal(out[i], to_tensor(expected)), i
    assert torch.equal(out[0], images[0])


def test_two_operations_then_cutout_equal_pil_in_sequence(images):
    augment = RandAugmentCutout()
    params = augment.draw(images.shape[0], torch.Generator().manual_seed(2))
    out = augment.apply(images, params)
    for i in range(images.shape[0]):
        image = to_pil(images[i])
        for slot in range(2):
            image = pil_op(image, RANDAUGMENT_OPS[int(params["ops"][i, slot])][0], float(params["magnitude"][i, slot]))
        image = pil_cutout(image, float(params["cutout"][i]), *map(float, params["cutout_xy"][i]))
        assert torch.equal(out[i], to_tensor(image)), i


def test_draws_cover_the_operations_and_their_ranges():
    params = RandAugmentCutout().draw(20000, torch.Generator().manual_seed(3))
    assert params["ops"].shape == (20000, 2) and set(params["ops"].flatten().tolist()) == set(range(14))
    counts = torch.bincount(params["ops"].flatten(), minlength=14).float() / 40000
    assert (counts - 1 / 14).abs().max() < 0.01  # random.choices: uniform, with replacement
    for index, (_, low, high) in enumerate(RANDAUGMENT_OPS):
        picked = params["magnitude"][params["ops"] == index]
        assert picked.min() >= low and picked.max() < high and picked.max() - picked.min() > 0.9 * (high - low)
    assert params["cutout"].min() >= 0 and params["cutout"].max() < 0.5


def _loader(images, **kw):
    return TensorBatchLoader(images, torch.arange(images.shape[0]), batch_size=8, mean=CIFAR100_MEAN,
                             std=CIFAR100_STD, augment=CropFlip(4), seed=5, **kw)


def test_loader_strong_view_leaves_the_weak_view_and_follows_its_plan(images):
    strong = RandAugmentCutout()
    with_strong, plain = _loader(images, strong=strong), _loader(images)
    plan = with_strong.plan(epoch=3)
    for step, (a, b) in enumerate(zip(with_strong.iterate(epoch=3), plain.iterate(epoch=3), strict=True)):
        assert torch.equal(a.image, b.image) and torch.equal(a.index, b.index) and b.strong_image is None
        rows = slice(8 * step, 8 * step + 8)
        draws = {k: v[rows] for k, v in plan.strong.items()}
        cropped = with_strong.crop_flip(images[a.index], draws["crop_x"], draws["crop_y"], draws["flip"])
        assert torch.equal(a.strong_image, with_strong.normalize(strong.apply(cropped, draws)))
    # Its own crops: independent of the weak view's.
    assert not torch.equal(plan.strong["crop_x"], plan.crop_x)
    resumed = list(_loader(images, strong=strong).iterate(epoch=3, start_step=1))
    assert torch.equal(resumed[0].strong_image, list(with_strong.iterate(epoch=3))[1].strong_image)


def test_distributed_ranks_split_the_strong_draws_like_the_order(images):
    full = _loader(images, strong=RandAugmentCutout()).plan(epoch=1)
    shards = [_loader(images, strong=RandAugmentCutout(), rank=r, world_size=3).plan(epoch=1) for r in range(3)]
    for rank, shard in enumerate(shards):
        padded = torch.cat([full.order, full.order[:2]])[rank::3]  # 16 samples, padded to 18
        assert torch.equal(shard.order, padded)
        assert torch.equal(shard.strong["ops"], torch.cat([full.strong["ops"], full.strong["ops"][:2]])[rank::3])


def test_only_in_memory_datasets_deliver_the_strong_view():
    with pytest.raises(UserInputError, match="strongly augmented second view"):
        build_data(SimpleNamespace(dataset="imagefolder"), seed=0, device=torch.device("cpu"), strong_view=True)

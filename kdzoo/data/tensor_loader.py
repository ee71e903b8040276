"""Small-image datasets held as one uint8 tensor on the training device, augmented per batch.

No per-sample Python work and no worker processes: the whole epoch's plan (sample order, crop
offsets, flips) is drawn at the start of the epoch from a generator seeded by (seed, epoch), and
each batch is gathered, cropped, flipped and normalised with a handful of tensor ops. Because the
plan is a pure function of (seed, epoch), resuming at step k of an epoch reproduces the remaining
batches exactly: the loader state is just (epoch, step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.data.strong_augment import RandAugmentCutout
from kdzoo.types import Batch


@dataclass(frozen=True)
class CropFlip:
    """RandomCrop(size, padding) with zero padding + RandomHorizontalFlip(0.5), the CIFAR recipe."""

    padding: int = 4
    flip: bool = True

    @property
    def num_offsets(self) -> int:
        return 2 * self.padding + 1


@dataclass
class EpochPlan:
    order: Tensor  # int64 [n] sample indices for this rank
    crop_x: Tensor | None
    crop_y: Tensor | None
    flip: Tensor | None
    # The strong view's own crop_x / crop_y / flip and RandAugment draws (RandAugmentCutout.draw), when requested.
    strong: dict[str, Tensor] | None = None


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Large odd multiplier keeps (seed, epoch) pairs from colliding for any realistic values.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class TensorBatchLoader:
    """Iterates :class:`Batch` objects over an in-memory uint8 image tensor."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        augment: CropFlip | None = None,
        strong: RandAugmentCutout | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = targets.to(self.device)
        self.batch_size = batch_size
        channels = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.augment = augment
        # A second, strongly augmented view of every sample (Batch.strong_image): its own crop/flip (when
        # ``augment`` is set), then ``strong``; drawn after the first view's plan, which it leaves unchanged.
        self.strong = strong
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def _per_rank(self) -> int:
        # Every rank sees the same number of samples (DistributedSampler's padding rule).
        return -(-self.num_samples // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        gen = _epoch_generator(self.seed, epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        crop_x = crop_y = flip = None
        if self.augment is not None:
            crop_x = torch.randint(0, self.augment.num_offsets, (n,), generator=gen)
            crop_y = torch.randint(0, self.augment.num_offsets, (n,), generator=gen)
            flip = self._draw_flips(n, gen)
        strong = None
        if self.strong is not None:
            strong = {}
            if self.augment is not None:
                strong["crop_x"] = torch.randint(0, self.augment.num_offsets, (n,), generator=gen)
                strong["crop_y"] = torch.randint(0, self.augment.num_offsets, (n,), generator=gen)
                strong["flip"] = self._draw_flips(n, gen)
            strong.update(self.strong.draw(n, gen))
        per_rank = self._per_rank()
        pad = per_rank * self.world_size - n
        take = slice(self.rank, None, self.world_size)

        def pick(t: Tensor | None) -> Tensor | None:
            # Every rank sees the same number of samples: the first `pad` entries repeat (DistributedSampler).
            return None if t is None else torch.cat([t, t[:pad]])[take].to(self.device)

        picked_strong = None if strong is None else {k: pick(v) for k, v in strong.items()}
        return EpochPlan(pick(order), pick(crop_x), pick(crop_y), pick(flip), picked_strong)  # type: ignore[arg-type]

    def _draw_flips(self, n: int, gen: torch.Generator) -> Tensor:
        assert self.augment is not None
        return torch.rand(n, generator=gen) < 0.5 if self.augment.flip else torch.zeros(n, dtype=torch.bool)

    def normalize(self, images_u8: Tensor) -> Tensor:
        # Same op order as ToTensor + Normalize, so values equal torchvision's pipeline bit for bit.
        return images_u8.float().div_(255.0).sub_(self.mean).div_(self.std)

    def crop_flip(self, images_u8: Tensor, crop_x: Tensor, crop_y: Tensor, flip: Tensor) -> Tensor:
        assert self.augment is not None
        pad = self.augment.padding
        b, c, h, w = images_u8.shape
        padded = F.pad(images_u8, (pad, pad, pad, pad))
        # Two gathers (rows, then columns) move 2x fewer index values than one 4-D advanced index.
        rows = crop_y[:, None] + torch.arange(h, device=self.device)
        picked_rows = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
        cols = torch.arange(w, device=self.device).expand(b, w)
        # Flipping = reading the crop's columns right to left.
        cols = torch.where(flip[:, None], cols.flip(1), cols) + crop_x[:, None]
        return picked_rows.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.plan(epoch)
        n = plan.order.numel()
        for step in range(start_step, len(self)):
            sl = slice(step * self.batch_size, min((step + 1) * self.batch_size, n))
            index = plan.order[sl]
            images = self.images[index]
            crop = None
            if plan.crop_x is not None:
                cx, cy, fl = plan.crop_x[sl], plan.crop_y[sl], plan.flip[sl]  # type: ignore[index]
                images = self.crop_flip(images, cx, cy, fl)
                crop = torch.stack([cx, cy, fl.long()], dim=1)
            strong_image = None
            if plan.strong is not None:
                draws = {k: v[sl] for k, v in plan.strong.items()}
                strong_image = self.normalize(self.strong_view(self.images[index], draws))
            yield Batch(self.normalize(images), self.targets[index], index, crop=crop, strong_image=strong_image)

    def strong_view(self, images_u8: Tensor, draws: dict[str, Tensor]) -> Tensor:
        """The strong view of uint8 images from its plan entries: crop/flip (when augmenting), then RandAugment."""
        assert self.strong is not None
        if self.augment is not None:
            images_u8 = self.crop_flip(images_u8, draws["crop_x"], draws["crop_y"], draws["flip"])
        return self.strong.apply(images_u8, draws)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(epoch=1)

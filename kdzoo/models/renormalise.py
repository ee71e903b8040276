"""Feeding a network images normalised for another: a teacher trained with other per-channel statistics than the
data loader applies (an ImageNet CNN next to a ViT student normalised with 0.5 / 0.5) sees its own normalisation.

The map is timm's ``DistillationTeacher.normalize_input`` (timm ``task/distillation.py``):
``x_teacher = (x · std_data + mean_data − mean_teacher) / std_teacher``, an affine map per channel. It is a
forward pre-hook on the network, so every caller (the teacher forward, feature probes, a method that runs the
teacher itself) gets it, and the model, its taps and its state_dict stay untouched (docs/config.md, Teacher input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdzoo.errors import UserInputError


class InputRenormalisation:
    """Forward pre-hook: the first input, normalised with ``source`` statistics, re-expressed in ``target`` ones."""

    def __init__(self, source_mean: Sequence[float], source_std: Sequence[float], target_mean: Sequence[float],
                 target_std: Sequence[float]):
        lengths = {len(source_mean), len(source_std), len(target_mean), len(target_std)}
        if len(lengths) != 1:
            raise UserInputError(
                f"teacher.mean / teacher.std need one value per image channel ({len(source_mean)}, as the data's "
                f"normalisation has); got {len(target_mean)} and {len(target_std)}"
            )
        if min(target_std) <= 0 or min(source_std) <= 0:
            raise UserInputError(f"teacher.std and the data's std must be positive; got {list(target_std)}")
        source_mean_t, source_std_t, target_mean_t, target_std_t = (
            torch.tensor([float(v) for v in values], dtype=torch.float64).view(1, -1, 1, 1)
            for values in (source_mean, source_std, target_mean, target_std)
        )
        # x · (s_std / t_std) + (s_mean − t_mean) / t_std: the same map as timm's, one multiply-add per pixel.
        self.scale = source_std_t / target_std_t
        self.shift = (source_mean_t - target_mean_t) / target_std_t
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def constants(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and shift on the images' device and dtype, copied there once (not every step)."""
        key = (images.device, images.dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.scale.to(images), self.shift.to(images))
        return self._on_device[key]

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        images = args[0]
        scale, shift = self.constants(images)
        return (images * scale + shift, *args[1:])


def renormalise_input(model: nn.Module, source_mean: Sequence[float], source_std: Sequence[float],
                      target_mean: Sequence[float], target_std: Sequence[float]) -> RemovableHandle:
    """Make ``model`` take images normalised with ``source_*`` statistics as if they had its own ``target_*`` ones."""
    return model.register_forward_pre_hook(InputRenormalisation(source_mean, source_std, target_mean, target_std))

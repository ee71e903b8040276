"""Helpers shared by the CIFAR architectures."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def check_input_size(model: nn.Module, x: Tensor, size: int | Sequence[int]) -> None:
    """Fail loudly where the reference's fixed pooling would fail obscurely or return garbage.

    ``size`` is the one square resolution the architecture supports, or several of them.
    """
    sizes = (size,) if isinstance(size, int) else tuple(size)
    if x.dim() != 4 or x.shape[-2] != x.shape[-1] or x.shape[-1] not in sizes:
        wanted = " or ".join(f"{s}x{s}" for s in sizes)
        raise ValueError(
            f"{type(model).__name__} expects inputs of shape [B, C, H, W] with H x W = {wanted} (its pooling "
            f"is fixed, as in the reference); got {list(x.shape)}"
        )


def check_4d(model: nn.Module, x: Tensor) -> None:
    """Architectures with adaptive pooling accept any size, but still need an image batch."""
    if x.dim() != 4:
        raise ValueError(f"{type(model).__name__} expects a [B, C, H, W] image batch; got shape {list(x.shape)}")

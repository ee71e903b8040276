"""What a method needs from ``torch.distributed`` when it keeps state beyond its gradients (CRD's memory
banks): the process's rank and count, and gathering or averaging small tensors across processes. Every
function is the identity in a single process, so methods call them unconditionally."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_cat(tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` (same shape on all) concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def average(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over processes (a new tensor; the input is left alone)."""
    if world_size() == 1:
        return tensor
    return total(tensor) / world_size()  # SUM, then divide: every backend has SUM (gloo has no AVG)


@torch.no_grad()
def total(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over processes (a new tensor)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out

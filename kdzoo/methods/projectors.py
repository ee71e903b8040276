"""Feature projectors shared by several methods. Not a method module: the registry does not import it
(``_ensure_loaded`` in ``kdzoo/methods/registry.py``)."""

from __future__ import annotations

from torch import nn


def bottleneck_projector(
    in_channels: int, mid_channels: int, out_channels: int, *, final_bn_relu: bool
) -> nn.Sequential:
    """The SimKD repository's conv projector (``models/util.py``): 1x1 (C_in -> mid) - BN - ReLU - 3x3 (mid -> mid) -
    BN - ReLU - 1x1 (mid -> C_out), bias-free convs with PyTorch's default init, then BN - ReLU when
    ``final_bn_relu`` (SimKD's projector has them, SemCKD's ``Proj`` ends with the conv).

    Built in the reference's order, so its Sequential indices are the reference's state_dict keys and a seeded
    run draws the reference's initial weights."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
    ]
    if final_bn_relu:
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)

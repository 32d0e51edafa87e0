"""Convolutional critics and energies for images ``[n, C, H, W] -> [n, 1]``.

* ``DCGANCritic`` (SFT-PG's image critic): stride-2 4x4 convolutions with LeakyReLU 0.2 that halve
  the resolution down to 4x4 (``log2(H) - 2`` of them, so 8x8 has one and 32x32 three, 64x64
  four), channels doubling from ``width``, then a linear head. No normalisation (a WGAN critic).
* ``ResNetEnergy`` (DxMI's energy / value, in the IGEBM style of Du & Mordatch 2019): residual
  blocks of two 3x3 convolutions with LeakyReLU 0.2 and **no normalisation layers**, average
  pooling between levels, a spatial-sum head and a learnable output affine. ``time_dependent``
  values of Alg. 1 are not offered for images: Alg. 2 uses a time-independent value.

Both are sized by config for 8x8 to 64x64 inputs and take the keys of the method's MLP
critic / value configs (``width``, ``depth``, ``activation``, ``out_dim``), so an experiment
swaps the ``_target_``; ``t`` is accepted and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from diffft.nets.mlp import as_shape, make_activation


def _image_shape(event_shape: Sequence[int], who: str) -> tuple[int, int, int]:
    shape = as_shape(event_shape)
    if len(shape) != 3:
        raise ValueError(f"{who} needs images [C, H, W], got event_shape={list(shape)}")
    return shape  # type: ignore[return-value]


def _scalar_output(out_dim: int, who: str) -> None:
    if out_dim != 1:
        raise ValueError(f"{who} outputs one value per image; got out_dim={out_dim}")


class DCGANCritic(nn.Module):
    """``depth`` stride-2 convolutions (None: down to 4x4), ``width`` channels doubling.

    ``conv_layers``: the total number of convolutions; those beyond the stride-2 ones are 3x3
    stride-1 convolutions at ``width`` channels before the first down-sampling (None: none). On
    8x8 digits the stride-2 rule gives one convolution, a nearly linear critic; the released
    SFT-PG image critic has four (``conv_layers: 4``).
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        width: int = 64,
        depth: int | None = None,
        activation: str = "leaky_relu_0.2",
        out_dim: int = 1,
        max_width: int = 512,
        conv_layers: int | None = None,
    ) -> None:
        super().__init__()
        _scalar_output(out_dim, "DCGANCritic")
        c, h, w = _image_shape(event_shape, "DCGANCritic")
        n_down = depth or max(1, int(round(math.log2(min(h, w)))) - 2)
        if conv_layers is not None and conv_layers < n_down:
            raise ValueError(
                f"critic.conv_layers={conv_layers} is fewer than the {n_down} stride-2 "
                f"convolutions that {h}x{w} images need (critic.depth={depth})"
            )
        layers: list[nn.Module] = []
        for _ in range((conv_layers or n_down) - n_down):
            layers += [nn.Conv2d(c, width, 3, 1, 1), make_activation(activation)]
            c = width
        for i in range(n_down):
            out = min(width * 2**i, max_width)
            layers += [nn.Conv2d(c, out, 4, 2, 1), make_activation(activation)]
            c = out
        self.body = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.body(torch.zeros(1, *as_shape(event_shape))).shape[1]
        self.head = nn.Linear(flat, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(x))


class ConvEncoder(DCGANCritic):
    """``DCGANCritic``'s body with an ``out_dim``-dimensional linear head: a feature encoder
    (the contrastive chain's SimCLR encoder of images, ``diffft.methods.encoder``)."""

    def __init__(
        self,
        event_shape: Sequence[int],
        width: int = 64,
        depth: int | None = None,
        activation: str = "leaky_relu_0.2",
        out_dim: int = 128,
        max_width: int = 512,
    ) -> None:
        super().__init__(event_shape, width, depth, activation, 1, max_width)
        self.head = nn.Linear(self.head.in_features, out_dim)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))


class ResNetEnergy(nn.Module):
    """``depth`` resolutions (pooled by 2 between them, down to at least 4x4) of ``blocks``
    residual blocks with ``width * 2**level`` channels (capped at ``max_width``)."""

    def __init__(
        self,
        event_shape: Sequence[int],
        width: int = 32,
        depth: int = 2,
        blocks: int = 1,
        activation: str = "leaky_relu_0.2",
        out_dim: int = 1,
        max_width: int = 256,
    ) -> None:
        super().__init__()
        _scalar_output(out_dim, "ResNetEnergy")
        c, h, w = _image_shape(event_shape, "ResNetEnergy")
        levels = max(1, min(depth, int(math.log2(min(h, w))) - 1))
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1)]
        c = width
        for level in range(levels):
            out = min(width * 2**level, max_width)
            for _ in range(blocks):
                layers.append(_Block(c, out, activation))
                c = out
            if level < levels - 1:
                layers.append(nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers, make_activation(activation))
        self.head = nn.Conv2d(c, 1, 1)
        self.scale = nn.Parameter(torch.ones(1))  # the learnable output affine
        self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        e = self.head(self.body(x)).sum((2, 3))  # spatial sum: [n, 1]
        return self.scale * e + self.shift

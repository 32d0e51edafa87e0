"""Image eps-networks ``(x [n, C, H, W], t [n]) -> eps [n, C, H, W]``.

* ``UNet``: a small time-conditioned UNet (Ho et al. 2020's layout, scaled down: residual blocks
  with GroupNorm and a sinusoidal time embedding added inside each block, stride-2 downsampling,
  nearest upsampling with skip connections) for 8x8 digits and 28x28 MNIST.
* ``DiffusersUNet``: diffusers' ``UNet2DModel`` as a backbone, built from config keys (e.g. the
  DDPM CIFAR-10 architecture, ``conf/backbone/ddpm_cifar10.yaml``) or loaded from a local
  ``save_pretrained`` folder (``path=DIR``; never the hub: the load is local-files-only).

Both take the network's own integer time index ``t`` (0..n_steps-1); the sinusoidal features are
scaled so that any ``n_steps`` spans the DDPM's [0, 1000).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffft.nets.mlp import as_shape


def timestep_embedding(t: torch.Tensor, dim: int, n_steps: int) -> torch.Tensor:
    """Sinusoidal features ``[n, dim]`` of ``t`` scaled to the [0, 1000) range."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * (1000.0 / n_steps) * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small UNet: ``channels * mults[i]`` channels at level ``i`` (resolution halved between
    levels), ``blocks`` residual blocks per level, GroupNorm with ``groups`` groups.

    ``UNet([1, 8, 8], 1000, channels=32, mults=(1, 2))`` has 0.45M parameters.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        n_steps: int,
        channels: int = 32,
        mults: Sequence[int] = (1, 2),
        blocks: int = 1,
        groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = as_shape(event_shape)
        if len(shape) != 3:
            raise ValueError(f"UNet needs images [C, H, W], got event_shape={list(shape)}")
        c_img, self.n_steps = shape[0], n_steps
        emb = 4 * channels
        self.emb_dim = channels
        self.time = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(c_img, channels, 3, padding=1)
        widths = [channels * m for m in mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c, skips = channels, []
        for i, w in enumerate(widths):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(c, w, emb, groups, dropout))
                c = w
                skips.append(c)
            self.down.append(level)
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, 1))
        self.mid = nn.ModuleList([ResBlock(c, c, emb, groups, dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        for w in reversed(widths):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(c + skips.pop(), w, emb, groups, dropout))
                c = w
            self.up.append(level)
        self.out = nn.Sequential(_norm(c, groups), nn.SiLU(), nn.Conv2d(c, c_img, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.emb_dim, self.n_steps))
        h, skips = self.inp(x), []
        for level, down in zip(self.down, self.downsample, strict=True):
            for block in level:
                h = block(h, emb)
                skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for level in self.up:
            for block in level:
                skip = skips.pop()
                if h.shape[-2:] != skip.shape[-2:]:
                    h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
                h = block(torch.cat([h, skip], 1), emb)
        return self.out(h)


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` as an eps-network: built from ``config`` (``UNet2DModel``
    keyword arguments; ``sample_size``, ``in_channels`` and ``out_channels`` come from the data)
    or loaded from a local ``save_pretrained`` folder ``path`` (no hub access: local files only,
    ``HF_HUB_OFFLINE=1``). The model's own ``num_train_timesteps`` should be ``n_steps``."""

    def __init__(
        self, event_shape: Sequence[int], n_steps: int, path: str | None = None, **config
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        shape = as_shape(event_shape)
        if len(shape) != 3:
            raise ValueError(f"DiffusersUNet needs images [C, H, W], got {list(shape)}")
        if path:
            folder = Path(path).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"backbone.path='{folder}': no UNet2DModel folder (config.json and weights "
                    "from save_pretrained; e.g. the 'unet' folder of a downloaded "
                    "google/ddpm-cifar10-32); download it beforehand: nothing is fetched at run "
                    "time"
                )
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.net = UNet2DModel.from_pretrained(str(folder), local_files_only=True)
            c, size = self.net.config.in_channels, self.net.config.sample_size
            if (c, size) != (shape[0], shape[1]):
                raise ValueError(
                    f"backbone.path='{folder}' is a UNet for {c}-channel {size}x{size} images, "
                    f"but the data are {list(shape)}"
                )
        else:
            c, h, _ = shape
            self.net = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, **config)
        self.n_steps = n_steps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample

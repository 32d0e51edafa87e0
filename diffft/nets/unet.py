"""Image eps-networks ``(x [n, C, H, W], t [n]) -> eps [n, C, H, W]``.

* ``UNet``: a small time-conditioned UNet (Ho et al. 2020's layout, scaled down: residual blocks
  with GroupNorm and a sinusoidal time embedding added inside each block, stride-2 downsampling,
  nearest upsampling with skip connections) for 8x8 digits and 28x28 MNIST.
* ``DiffusersUNet``: diffusers' ``UNet2DModel`` as a backbone, built from config keys (e.g. the
  DDPM CIFAR-10 architecture, ``conf/backbone/ddpm_cifar10.yaml``) or loaded from a local
  ``save_pretrained`` folder (``path=DIR``; never the hub: the load is local-files-only), or
  built from config keys and loaded from an original ``pytorch_diffusion`` / DDIM-format
  checkpoint (``pytorch_diffusion=FILE``, the format the SFT-PG and DxMI code start from; keys
  mapped by ``from_pytorch_diffusion``).

Both take the network's own integer time index ``t`` (0..n_steps-1); the sinusoidal features are
scaled so that any ``n_steps`` spans the DDPM's [0, 1000).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
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


# Module names of diffusers' UNet2DModel -> the original DDPM code (pesser/pytorch_diffusion, also
# ermongroup/ddim and the SFT-PG / DxMI releases). Up levels are numbered from the top resolution
# there (``up.insert(0, ...)``) and from the bottom in diffusers: up_blocks.k = up.{L-1-k}.
_BLOCK_PARTS = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _pytorch_diffusion_name(key: str, levels: int) -> str:
    fixed = {
        "time_embedding.linear_1": "temb.dense.0",
        "time_embedding.linear_2": "temb.dense.1",
        "conv_norm_out": "norm_out",
        "mid_block.resnets.0": "mid.block_1",
        "mid_block.resnets.1": "mid.block_2",
        "mid_block.attentions.0": "mid.attn_1",
    }
    for new, old in fixed.items():
        if key.startswith(new + "."):
            key = old + key[len(new) :]
            break
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|\w+samplers)\.(\d+)\.", key)
    if m:
        side, level, kind, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        level = level if side == "down" else levels - 1 - level
        head = {"resnets": f"block.{j}", "attentions": f"attn.{j}"}.get(
            kind, "downsample" if kind == "downsamplers" else "upsample"
        )
        key = f"{side}.{level}.{head}." + key[m.end() :]
    for new, old in {**_BLOCK_PARTS, **_ATTN_PARTS}.items():
        key = re.sub(rf"\.{re.escape(new)}\.(weight|bias)$", rf".{old}.\1", key)
    return key


def from_pytorch_diffusion(
    state: Mapping[str, torch.Tensor], unet: nn.Module
) -> dict[str, torch.Tensor]:
    """A ``pytorch_diffusion``-format state dict as the state dict of the diffusers
    ``UNet2DModel`` ``unet`` (same architecture), strictly: every key of either side must be
    matched, else a ``KeyError`` names the missing and unexpected keys. Attention projections
    (1x1 convolutions there, linear layers here) are reshaped; a ``module.`` prefix (from
    ``DataParallel``) is dropped."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = unet.state_dict()
    levels = len(unet.config.block_out_channels)
    names = {k: _pytorch_diffusion_name(k, levels) for k in target}
    missing = sorted(o for o in names.values() if o not in state)
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        raise KeyError(
            "pytorch_diffusion checkpoint does not match the configured UNet2DModel: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)}); check block_out_channels / layers_per_block / the attention "
            "blocks against the checkpoint's ch, ch_mult, num_res_blocks, attn_resolutions"
        )
    out = {}
    for key, old in names.items():
        value = state[old]
        if value.shape != target[key].shape:
            if value.numel() != target[key].numel():
                raise KeyError(
                    f"pytorch_diffusion key {old}: shape {list(value.shape)}, the UNet's "
                    f"{key} has {list(target[key].shape)}"
                )
            value = value.reshape(target[key].shape)
        out[key] = value
    return out


def to_pytorch_diffusion(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``from_pytorch_diffusion``: ``unet``'s weights under the original names
    (attention projections as 1x1 convolutions)."""
    levels = len(unet.config.block_out_channels)
    out = {}
    for key, value in unet.state_dict().items():
        old = _pytorch_diffusion_name(key, levels)
        is_attn_proj = value.ndim == 2 and re.search(r"\.(q|k|v|proj_out)\.weight$", old)
        out[old] = value[:, :, None, None] if is_attn_proj else value
    return out


def load_pytorch_diffusion(path: str | Path, unet: nn.Module) -> None:
    """Load an original DDPM checkpoint file (a state dict, or the DDIM code's list whose first
    item is one) into ``unet``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"backbone.pytorch_diffusion='{file}': no such checkpoint file (e.g. the "
            "pytorch_diffusion 'model-790000.ckpt' of DDPM CIFAR-10, downloaded beforehand)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, (list, tuple)):
        state = state[0]
    unet.load_state_dict(from_pytorch_diffusion(state, unet), strict=True)


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` as an eps-network: built from ``config`` (``UNet2DModel``
    keyword arguments; ``sample_size``, ``in_channels`` and ``out_channels`` come from the data)
    or loaded from a local ``save_pretrained`` folder ``path`` (no hub access: local files only,
    ``HF_HUB_OFFLINE=1``), or built from ``config`` and loaded from an original
    ``pytorch_diffusion``-format checkpoint file. The model's own ``num_train_timesteps`` should be
    ``n_steps``."""

    def __init__(
        self,
        event_shape: Sequence[int],
        n_steps: int,
        path: str | None = None,
        pytorch_diffusion: str | None = None,
        **config,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        shape = as_shape(event_shape)
        if len(shape) != 3:
            raise ValueError(f"DiffusersUNet needs images [C, H, W], got {list(shape)}")
        if path and pytorch_diffusion:
            raise ValueError(
                "backbone.path and backbone.pytorch_diffusion are both set: give one (a diffusers "
                "save_pretrained folder, or an original-format checkpoint file)"
            )
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
            if pytorch_diffusion:
                load_pytorch_diffusion(pytorch_diffusion, self.net)
        self.n_steps = n_steps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample

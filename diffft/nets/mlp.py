"""Small MLPs for 2-D data: the time-gated eps-network, critics, value and energy networks.

Plain ``nn.Module``s whose constructor arguments are the config keys of ``conf/backbone`` and
``conf/method``; ``event_shape`` (the shape of one sample) is filled in by the method. An input of
any event shape is flattened to its D = prod(event_shape) values (e.g. the SFT-PG baseline MLP on
a flattened image), and an eps-network's output has the input's shape. Time inputs are integer
step indices (``LongTensor [n]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "leaky_relu_0.2": lambda: nn.LeakyReLU(0.2),  # DCGAN / IGEBM
    "tanh": nn.Tanh,
}


def as_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``event_shape`` as a tuple (an int D is the shape ``(D,)`` of points)."""
    return (
        (int(event_shape),) if isinstance(event_shape, int) else tuple(int(d) for d in event_shape)
    )


def flat_dim(event_shape: int | Sequence[int]) -> int:
    """D, the number of values in one sample of shape ``event_shape``."""
    return math.prod(as_shape(event_shape))


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class GatedLinear(nn.Module):
    """``Linear(x) * gate[t]``: the SFT-PG toy code's per-timestep multiplicative embedding."""

    def __init__(self, num_in: int, num_out: int, n_steps: int) -> None:
        super().__init__()
        self.lin = nn.Linear(num_in, num_out)
        self.gate = nn.Embedding(n_steps, num_out)
        # Same initialisation as the released ConditionalLinear.
        nn.init.uniform_(self.gate.weight)
        nn.init.xavier_normal_(self.lin.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.gate(t)


class TimeMLP(nn.Module):
    """Time-conditioned MLP ``(x, t) -> R^out``: ``depth`` gated hidden layers, then a linear head.

    As eps-network: ``out_dim = None`` (an output of the input's shape). As baseline / value:
    ``out_dim = 1`` (the SFT-PG baseline also gates its output layer: ``gated_output=True``).
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        n_steps: int,
        width: int = 128,
        depth: int = 3,
        activation: str = "softplus",
        out_dim: int | None = None,
        gated_output: bool = False,
    ) -> None:
        super().__init__()
        if n_steps < 1 or depth < 1:
            raise ValueError(f"TimeMLP needs n_steps >= 1 and depth >= 1, got {n_steps}, {depth}")
        self.n_steps, self.event_shape, dim = n_steps, as_shape(event_shape), flat_dim(event_shape)
        self.out_shape = (out_dim,) if out_dim else self.event_shape
        sizes = [dim] + [width] * depth
        self.hidden = nn.ModuleList(
            GatedLinear(a, b, n_steps) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.act = make_activation(activation)
        out = out_dim or dim
        self.head = GatedLinear(width, out, n_steps) if gated_output else nn.Linear(width, out)
        self.gated_output = gated_output

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # a no-op for [n, D] points
        for layer in self.hidden:
            x = self.act(layer(x, t))
        out = self.head(x, t) if self.gated_output else self.head(x)
        return out.view(-1, *self.out_shape)


class MLP(nn.Module):
    """Unconditional MLP ``x -> R^out`` (critic, energy)."""

    def __init__(
        self,
        event_shape: int | Sequence[int],
        width: int = 256,
        depth: int = 2,
        activation: str = "relu",
        out_dim: int = 1,
    ) -> None:
        super().__init__()
        dim = flat_dim(event_shape)
        layers: list[nn.Module] = []
        for a, b in zip([dim] + [width] * (depth - 1), [width] * depth, strict=True):
            layers += [nn.Linear(a, b), make_activation(activation)]
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.flatten(1))


class SinusoidalTimeMLP(nn.Module):
    """eps-network ``(x, t) -> R^out`` with a time embedding shared across steps.

    Sinusoidal features of ``t`` (Vaswani et al. 2017, as in the DDPM UNet), scaled so that the
    whole schedule spans ``[0, 1000)`` whatever ``n_steps`` is, go through a small MLP; its output
    is added to every residual block's input. Neighbouring steps share parameters, so all
    ``n_steps`` train jointly: a T = 1000 model learns much faster than with ``TimeMLP``'s gating
    table, where each step owns its own gate row and sees 1/1000 of the batches. Fractional ``t``
    (FastDPM VAR with ``continuous_time``) is accepted.
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        n_steps: int,
        width: int = 128,
        depth: int = 3,
        activation: str = "silu",
        emb_dim: int = 64,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if n_steps < 1 or depth < 1 or emb_dim < 2 or emb_dim % 2:
            raise ValueError(
                f"SinusoidalTimeMLP needs n_steps >= 1, depth >= 1 and an even emb_dim >= 2, "
                f"got {n_steps}, {depth}, {emb_dim}"
            )
        self.n_steps, self.event_shape, dim = n_steps, as_shape(event_shape), flat_dim(event_shape)
        self.out_shape = (out_dim,) if out_dim else self.event_shape
        half = emb_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", (freqs * 1000.0 / n_steps).float(), persistent=False)
        self.time = nn.Sequential(
            nn.Linear(emb_dim, width), make_activation(activation), nn.Linear(width, width)
        )
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = make_activation(activation)
        self.head = nn.Linear(width, out_dim or dim)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        # A sampler queries one t for the whole batch: embed each distinct t once.
        t, where = t.unique(return_inverse=True)
        angles = t.float()[:, None] * self.freqs[None]
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=1))[where]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(self.act(h + emb))
        return self.head(self.act(h)).view(-1, *self.out_shape)

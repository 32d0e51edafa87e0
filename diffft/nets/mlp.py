"""Small MLPs for 2-D data: the time-gated eps-network, critics, value and energy networks.

Plain ``nn.Module``s whose constructor arguments are the config keys of ``conf/backbone`` and
``conf/method``. Time inputs are integer step indices (``LongTensor [n]``).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


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

    As eps-network: ``out_dim = dim``. As baseline / value: ``out_dim = 1`` (the SFT-PG baseline
    also gates its output layer: ``gated_output=True``).
    """

    def __init__(
        self,
        dim: int,
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
        self.n_steps = n_steps
        sizes = [dim] + [width] * depth
        self.hidden = nn.ModuleList(
            GatedLinear(a, b, n_steps) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.act = make_activation(activation)
        out = out_dim or dim
        self.head = GatedLinear(width, out, n_steps) if gated_output else nn.Linear(width, out)
        self.gated_output = gated_output

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.act(layer(x, t))
        return self.head(x, t) if self.gated_output else self.head(x)


class MLP(nn.Module):
    """Unconditional MLP ``x -> R^out`` (critic, energy)."""

    def __init__(
        self,
        dim: int,
        width: int = 256,
        depth: int = 2,
        activation: str = "relu",
        out_dim: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([dim] + [width] * (depth - 1), [width] * depth, strict=True):
            layers += [nn.Linear(a, b), make_activation(activation)]
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)

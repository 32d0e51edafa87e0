"""Forward process q(x_t | x_0) and the DDPM denoising loss (Ho et al. 2020, Eq. 14)."""

from __future__ import annotations

import torch
from torch import nn


def q_sample(x0: torch.Tensor, alpha_bar_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise``; ``alpha_bar_t`` has shape ``[n]``."""
    ab = alpha_bar_t.view(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def denoising_loss(
    eps_net: nn.Module,
    x0: torch.Tensor,
    alpha_bar: torch.Tensor,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
) -> torch.Tensor:
    """``E_{t, eps} ||eps - eps_net(x_t, t)||^2`` with ``t`` uniform over the T network steps.

    ``alpha_bar`` is the full ``[T]`` schedule (index i = network time i). ``antithetic`` pairs
    each t with T-1-t, as the SFT-PG toy code does (lower-variance loss estimate).
    """
    n, T = x0.shape[0], alpha_bar.shape[0]
    if antithetic:
        half = torch.randint(0, T, (n // 2 + 1,), generator=generator, device=x0.device)
        t = torch.cat([half, T - 1 - half])[:n]
    else:
        t = torch.randint(0, T, (n,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = q_sample(x0, alpha_bar[t], noise)
    return (eps_net(x_t, t) - noise).square().mean()

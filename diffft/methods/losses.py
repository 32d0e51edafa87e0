"""Small loss functions shared by the methods; each is unit-tested on its own.

Conventions: a critic ``f`` is a *cost* (low on data, high on samples), as in the SFT-PG code:
the critic minimises ``E_data f - E_model f`` and the sampler minimises ``E_model f``.
"""

from __future__ import annotations

import torch
from torch import nn


def ipm_critic_loss(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """``E_data f - E_model f``: minimising it maximises the IPM estimate g (SFT-PG Eq. 13)."""
    return f_real.mean() - f_fake.mean()


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP (SFT-PG Eq. 22): ``E (||grad f(x_hat)|| - 1)^2`` on random interpolates of
    equally many real and fake points."""
    n = min(real.shape[0], fake.shape[0])
    real, fake = real[:n].detach(), fake[:n].detach()
    u = torch.rand((n,) + (1,) * (real.dim() - 1), generator=generator, device=real.device)
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def baseline_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """R_B (SFT-PG Eq. 21): mean squared error between the baseline ``V(x_k, k)`` and the
    return ``f(x_0)`` of the same trajectory. Gradients reach ``returns`` unless detached: that
    is the baseline regularisation of the critic (Eq. 23)."""
    return (values - returns).square().mean()


def policy_gradient_loss(log_prob: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE with baseline (SFT-PG Eq. 20): ``mean(adv * log p(x_{k-1} | x_k))`` with the
    advantage ``f(x_0) - V(x_k, k)`` held constant; its gradient is that of ``E f(x_0)``."""
    return (advantage.detach() * log_prob).mean()

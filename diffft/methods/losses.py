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


# -- DxMI (Yoon et al. 2024); time index of diffft: the chain steps x_k -> x_{k-1}, x_0 = sample --
def energy_loss(e_real: torch.Tensor, e_fake: torch.Tensor, gamma: float) -> torch.Tensor:
    """DxMI's EBM update (Alg. 1 line 4): ``E_data E - E_model E + gamma (E_data E^2 +
    E_model E^2)``; the squared-energy term keeps the energy bounded."""
    contrast = e_real.mean() - e_fake.mean()
    return contrast + gamma * (e_real.square().mean() + e_fake.square().mean())


def running_cost(
    log_prob: torch.Tensor,
    sq_step: torch.Tensor,
    s2: torch.Tensor,
    tau1: float,
    tau2: float,
    dim: int,
    reduction: str = "sum",
) -> torch.Tensor:
    """The running cost of one transition (DxMI Eq. 8 / 9): ``tau1 log pi(x_{k-1} | x_k) +
    tau2 ||x_k - x_{k-1}||^2 / (2 s_k^2)``. ``log_prob`` and ``sq_step`` are sums over the D
    dimensions; ``reduction='mean'`` divides both by D (what the released image code does)."""
    cost = tau1 * log_prob + tau2 * sq_step / (2 * s2)
    return cost / dim if reduction == "mean" else cost


def entropy_cost(log_sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """``-D log sigma_k``: ``log pi(x_{k-1} | x_k)`` of a reparameterised Gaussian step up to
    terms without gradient (the negative conditional entropy, Sec. 4.1: with the noise held
    fixed, ``x_{k-1} - mu = sigma * noise`` and only ``-D log sigma`` depends on the
    parameters; Alg. 2 line 10 writes it this way)."""
    return -dim * log_sigma


def td_loss(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bellman residual (DxMI Eq. 10 / 12): ``(sg[target] - V_k(x_k))^2``, averaged."""
    return (target.detach() - value).square().mean()


def avr_update(s2: torch.Tensor, mean_sq_step: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adaptive velocity regularisation (Sec. 4.2): ``s_k^2 <- alpha s_k^2 + (1 - alpha)
    E||x_k - x_{k-1}||^2 / D`` (its fixed point is the optimal s_k^2 of Eq. 15)."""
    return alpha * s2 + (1 - alpha) * mean_sq_step


TIME_COSTS = ("none", "linear", "sigmoid")


def time_cost(kind: str, steps: int, c: float = 0.05) -> torch.Tensor:
    """R for every transition (Sec. 4.3, Eq. 12), indexed by diffft's step k = 1..K
    (index 0 unused): ``linear`` R = c; ``sigmoid`` R(t) = s(T/2 - t) - s(T/2 - t - 1) in the
    paper's time t = K - k (the released code's floor(T/2)); ``none`` R = 0."""
    if kind not in TIME_COSTS:
        raise ValueError(f"method.time_cost={kind!r}; expected one of {TIME_COSTS}")
    k = torch.arange(steps + 1, dtype=torch.float64)
    t = steps - k  # the paper's time of the transition x_t -> x_{t+1}
    if kind == "linear":
        r = torch.full_like(k, c)
    elif kind == "sigmoid":
        half = steps // 2
        r = torch.sigmoid(half - t) - torch.sigmoid(half - t - 1)
    else:
        r = torch.zeros_like(k)
    r[0] = 0.0
    return r.float()

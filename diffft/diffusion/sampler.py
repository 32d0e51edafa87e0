"""The ``Sampler`` protocol, and training-free solvers from diffusers on our eps-networks.

Everything that draws samples for a table, a plot or ``diffft.sample`` sees only a ``Sampler``:
``sample(n, *, generator=None, batch_size=None)``, ``device`` and ``event_shape``.
``GaussianChain`` (every method's Markov chain) is one; ``SchedulerSampler`` is the other: a
diffusers scheduler (``DDIMScheduler`` with eta = 0, ``DPMSolverMultistepScheduler`` as
DPM-Solver++(2M); Song et al. 2021, Lu et al. 2022) driven by a DDPM's eps-network with
``trained_betas`` = that DDPM's schedule. These are the baselines a user would pick instead of
fine-tuning, at the same number of steps (network evaluations) as a fine-tuned chain.

DPM-Solver++ is multistep (it keeps the last model outputs), so it is not a ``GaussianChain``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

SOLVERS = {"ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)"}


@runtime_checkable
class Sampler(Protocol):
    """Anything that draws ``n`` samples of shape ``event_shape`` on ``device``."""

    event_shape: tuple[int, ...]

    @property
    def device(self) -> torch.device: ...

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor: ...


def in_batches(n: int, batch_size: int | None, draw: Any) -> torch.Tensor:
    """``draw(m)`` for consecutive chunks of at most ``batch_size`` of ``n``, concatenated."""
    if not batch_size or batch_size >= n:
        return draw(n)
    return torch.cat([draw(min(batch_size, n - i)) for i in range(0, n, batch_size)])


def make_scheduler(solver: str, betas: torch.Tensor) -> Any:
    """A diffusers scheduler for ``solver`` (a key of ``SOLVERS``) on the full ``betas``.

    Both use ``timestep_spacing="trailing"`` (the first step at the last network time, where
    ``x ~ N(0, I)`` matches the forward process best) and land on ``x_0`` in the last step.
    ``clip_sample=False``: diffusers' DDIM clips x0_hat to [-1, 1] by default (wrong off images).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = {
        "num_train_timesteps": len(betas),
        "trained_betas": betas.detach().cpu().double().numpy(),
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
    }
    if solver == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if solver == "dpmpp2m":
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
        )
    raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")


class SchedulerSampler(nn.Module):
    """A diffusers scheduler run for ``steps`` steps on a DDPM's eps-network.

    Args:
        eps_net: ``(x, t) -> eps`` with ``t`` the network's integer time per sample.
        betas: the full ``[T]`` schedule the network was trained with.
        steps: number of solver steps (= network evaluations).
        solver: ``ddim`` (eta = 0) or ``dpmpp2m``.
        event_shape: shape of one sample.
    """

    def __init__(
        self,
        eps_net: nn.Module,
        betas: torch.Tensor,
        steps: int,
        solver: str,
        event_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        if not 1 <= steps <= len(betas):
            raise ValueError(f"solver steps must be in 1..{len(betas)}, got {steps}")
        if solver == "ddim" and len(betas) % steps:
            # DDIMScheduler steps from t to t - T // S, not to the next of its own timesteps.
            raise ValueError(
                f"solver=ddim: steps={steps} must divide T={len(betas)} (diffusers' DDIM "
                "steps by T // steps and would query the network at other times than it steps to)"
            )
        self.eps_net, self.betas = eps_net, betas
        self.steps, self.solver, self.event_shape = steps, solver, tuple(event_shape)
        self.scheduler = make_scheduler(solver, betas)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to()

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def label(self) -> str:
        return f"{SOLVERS[self.solver]} T'={self.steps}"

    @torch.no_grad()
    def sample(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        return in_batches(n, batch_size, lambda m: self._sample(m, generator))

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=self.device)  # also resets the multistep state
        x = torch.randn((n, *self.event_shape), generator=generator, device=self.device)
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.long, device=self.device)
            x = sched.step(self.eps_net(x, tt), t, x).prev_sample
        return x

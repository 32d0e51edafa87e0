"""The one sampling chain every method uses.

Time index (DDPM convention, everywhere in diffft): ``x_K ~ N(0, I)`` is noise, ``x_0`` is data,
and the chain steps ``k = K, ..., 1`` with the Gaussian transition

    p(x_{k-1} | x_k) = N(mu(x_k, k), sigma_k^2 I),   mu = c_x[k] * x_k + c_eps[k] * eps(x_k, t_k)

where ``eps`` is a pretrained eps-network queried at its own time index ``t_k`` (the chain may be
a sub-sampled T'-step view of a T-step model, see ``schedules.subsample``). Both DDPM ancestral
sampling (Ho et al. 2020, Eq. 11) and DDIM (Song et al. 2021, Eq. 12, with eta) are linear in
``x_k`` and ``eps``, so one pair of coefficients covers both.

``sigma_k`` is either fixed (from the schedule) or a learnable per-step ``log_sigma`` (DxMI);
the mean keeps using the fixed schedule either way, as in the DxMI release.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from diffft.diffusion.sampler import in_batches
from diffft.diffusion.schedules import StepSchedule

PARAMETERISATIONS = ("ddpm", "ddim")
VARIANCES = ("beta", "posterior")
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class Trajectory:
    """A rolled-out chain: ``states[k]`` is ``x_k`` (``states[0]`` sample, ``states[K]`` noise)."""

    states: torch.Tensor  # [K+1, n, *event_shape]
    # noise[k-1]: the standard normal draw of step k (x_{k-1} = mu(x_k) + sigma_k * noise[k-1])
    noise: torch.Tensor | None = None  # [K, n, *event_shape], with return_noise=True

    @property
    def sample(self) -> torch.Tensor:
        return self.states[0]

    @property
    def steps(self) -> int:
        return self.states.shape[0] - 1

    def transitions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``K * n`` transitions, flattened: ``(x_k, x_{k-1}, k)`` with ``k`` a LongTensor."""
        K, n = self.steps, self.states.shape[1]
        x_k = self.states[1:].reshape(K * n, *self.states.shape[2:])
        x_prev = self.states[:-1].reshape(K * n, *self.states.shape[2:])
        k = torch.arange(1, K + 1, device=self.states.device).repeat_interleave(n)
        return x_k, x_prev, k

    def transition_noise(self) -> torch.Tensor:
        """The noise of every transition, in the order of ``transitions()``."""
        if self.noise is None:
            raise ValueError("this trajectory was sampled without return_noise=True")
        return self.noise.reshape(-1, *self.noise.shape[2:])


def _coefficients(
    ab: torch.Tensor, parameterisation: str, eta: float, variance: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(c_x, c_eps, sigma)`` of length K+1 (index 0 unused) from ``alpha_bar[0..K]``."""
    ab_k, ab_prev = ab[1:], ab[:-1]
    beta = 1 - ab_k / ab_prev
    posterior_var = beta * (1 - ab_prev) / (1 - ab_k)
    if parameterisation == "ddpm":
        c_x = 1 / torch.sqrt(1 - beta)
        c_eps = -beta / (torch.sqrt(1 - beta) * torch.sqrt(1 - ab_k))
        sigma = torch.sqrt(beta if variance == "beta" else posterior_var)
    elif parameterisation == "ddim":
        sigma = eta * torch.sqrt(posterior_var)
        # x0_hat = (x - sqrt(1-ab_k) eps) / sqrt(ab_k)
        # mean = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps
        c_x = torch.sqrt(ab_prev / ab_k)
        c_eps = torch.sqrt((1 - ab_prev - sigma**2).clamp_min(0)) - c_x * torch.sqrt(1 - ab_k)
    else:
        raise ValueError(
            f"unknown sampler.parameterisation {parameterisation!r}; expected one of "
            f"{PARAMETERISATIONS}"
        )
    pad = torch.zeros(1, dtype=torch.float64)
    return torch.cat([pad, c_x]), torch.cat([pad, c_eps]), torch.cat([pad, sigma])


class GaussianChain(nn.Module):
    """K-step Gaussian Markov sampler built from an eps-network and a ``StepSchedule``.

    Args:
        eps_net: ``(x, t) -> eps`` with ``t`` the network's own time index per sample.
        schedule: alpha_bar of the K chain states and the network time of each.
        event_shape: shape of one sample, e.g. ``(2,)``.
        parameterisation: ``ddpm`` (ancestral) or ``ddim``.
        eta: DDIM stochasticity (1 = DDPM posterior variance, 0 = deterministic).
        variance: for ``ddpm``: ``beta`` (sigma_k^2 = beta_k, the SFT-PG toy code) or
            ``posterior`` (beta tilde).
        learn_sigma: make ``log sigma_k`` a parameter (initialised at the fixed sigma).
        sigma_min: lower bound on every sigma_k (a zero-variance step has no log-prob).
        sigma_last: when set, the last step's sigma_1 (the step that outputs x_0) is this value
            instead of the schedule's: the released SFT-PG / DxMI image chains use the posterior
            variance with sigma_1 = 0.001 (sigma tilde_1 = 0 has no density; sqrt(beta_1) adds
            visible noise to the sample).
        continuous_time: pass fractional network times (FastDPM VAR); else round to integers.
    """

    def __init__(
        self,
        eps_net: nn.Module,
        schedule: StepSchedule,
        event_shape: tuple[int, ...],
        parameterisation: str = "ddpm",
        eta: float = 1.0,
        variance: str = "beta",
        learn_sigma: bool = False,
        sigma_min: float = 0.0,
        continuous_time: bool = False,
        sigma_last: float | None = None,
    ) -> None:
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(f"unknown sampler.variance {variance!r}; expected one of {VARIANCES}")
        self.eps_net = eps_net
        self.event_shape = tuple(event_shape)
        self.steps = schedule.steps
        c_x, c_eps, sigma = _coefficients(schedule.alpha_bar, parameterisation, eta, variance)
        sigma = sigma.clamp_min(sigma_min)
        if sigma_last is not None:
            if not sigma_last > 0:
                raise ValueError(f"sampler.sigma_last={sigma_last}: expected a value > 0 or null")
            sigma[1] = sigma_last
        sigma[0] = 1.0  # unused slot; keeps log finite
        # Steps with sigma_k = 0 (variance=posterior at k = 1, DDIM with eta = 0) are
        # deterministic: fine for sampling, but they have no density (log_prob would be NaN).
        self.zero_sigma_steps = tuple(int(k) for k in torch.nonzero(sigma == 0).flatten())
        if learn_sigma:
            self.require_density("sampler.learn_sigma=true")
        net_t = schedule.net_t.clamp_min(0)
        self.register_buffer("c_x", c_x.float())
        self.register_buffer("c_eps", c_eps.float())
        self.register_buffer("fixed_sigma", sigma.float())
        self.register_buffer("net_t", net_t.float() if continuous_time else net_t.round().long())
        self.register_buffer("alpha_bar", schedule.alpha_bar.float())
        self.log_sigma = nn.Parameter(sigma.log().float()) if learn_sigma else None
        # sigma_last also holds a learned sigma_1 fixed (the DxMI release learns sigma_2..K only)
        self.fixed_last = sigma_last is not None

    @property
    def device(self) -> torch.device:
        return self.c_x.device

    def require_density(self, why: str) -> None:
        """Raise unless every step has sigma_k > 0 (``why``: the config key that needs it)."""
        if self.zero_sigma_steps:
            raise ValueError(
                f"{why} needs sigma_k > 0 at every step, but sigma_k = 0 at "
                f"k={list(self.zero_sigma_steps)} (sampler.variance=posterior makes sigma_1 = 0; "
                "sampler.parameterisation=ddim with sampler.eta=0 makes every sigma_k = 0); set "
                "sampler.sigma_min (e.g. 1e-4), or sampler.variance=beta / sampler.eta>0"
            )

    # -- one transition ---------------------------------------------------------------------
    def _per_sample(self, coef: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return coef[k].view(-1, *([1] * len(self.event_shape)))

    def log_sigma_table(self) -> torch.Tensor:
        """``log sigma_k`` for k = 0..K (index 0 unused): the learned values, with sigma_1 held at
        ``sigma_last`` when that is set; the fixed schedule's when sigma is not learned."""
        if self.log_sigma is None:
            return self.fixed_sigma.log()
        if not self.fixed_last:
            return self.log_sigma
        last = self.fixed_sigma[1:2].log()
        return torch.cat([self.log_sigma[:1], last, self.log_sigma[2:]])

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        """sigma_k per sample, shape ``[n, 1, ...]`` (broadcastable against x)."""
        table = self.fixed_sigma if self.log_sigma is None else self.log_sigma_table().exp()
        return self._per_sample(table, k)

    def mean(self, x_k: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """mu(x_k, k); ``k`` is a LongTensor ``[n]`` in 1..K."""
        eps = self.eps_net(x_k, self.net_t[k])
        return self._per_sample(self.c_x, k) * x_k + self._per_sample(self.c_eps, k) * eps

    def step(self, x_k: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Reparameterised transition ``x_{k-1} = mu(x_k, k) + sigma_k * noise``."""
        return self.mean(x_k, k) + self.sigma(k) * noise

    def log_prob_of_noise(self, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``log p(x_{k-1} | x_k)`` of a transition drawn with ``noise`` (``x_{k-1} = mu +
        sigma_k noise``): the same value as ``log_prob`` without evaluating the eps-network."""
        if self.zero_sigma_steps:
            self.require_density("log_prob")
        per_dim = -0.5 * noise**2 - self.sigma(k).log() - 0.5 * _LOG_2PI
        return per_dim.flatten(1).sum(1)

    def log_prob(self, x_prev: torch.Tensor, x_k: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """log p(x_{k-1} | x_k), summed over dimensions: shape ``[n]``."""
        if self.zero_sigma_steps:
            self.require_density("log_prob")
        mu, sigma = self.mean(x_k, k), self.sigma(k)
        z = (x_prev - mu) / sigma
        per_dim = -0.5 * z**2 - sigma.log() - 0.5 * _LOG_2PI
        return per_dim.flatten(1).sum(1)

    # -- the whole chain --------------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        grad: bool = False,
        x_K: torch.Tensor | None = None,
        batch_size: int | None = None,
        guide: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        return_noise: bool = False,
        checkpoint: bool = False,
        window: int | None = None,
    ) -> torch.Tensor | Trajectory:
        """Run the chain from ``x_K ~ N(0, I)`` to ``x_0`` (the ``Sampler`` protocol).

        ``grad=False`` rolls out under ``torch.no_grad()`` (not ``inference_mode``: the returned
        trajectory can be reused to compute gradients). ``grad=True`` keeps the graph through
        every step (pathwise / BPTT gradients). ``batch_size`` bounds the memory of a large
        ``n`` (samples only). ``guide(x_{k-1}, k - 1)`` returns a corrected state after each step
        (DxMI's value guidance). ``return_noise`` keeps each step's noise in the trajectory.

        Back-propagation through time (``grad=True``; the contrastive chain):

        * ``checkpoint``: each step's activations are recomputed in the backward pass instead of
          kept (``torch.utils.checkpoint``, per step): the graph then holds only the K + 1
          states, the same gradients for about one more forward pass.
        * ``window``: truncated BPTT. The chain's state is detached every ``window`` steps
          (before steps K, K - window, ...), so a gradient flows back through at most
          ``window`` transitions: ``window=1`` gives each state the gradient of its own last
          transition only (no BPTT); None: through the whole chain.
        """
        if window is not None and window < 1:
            raise ValueError(f"window={window}: expected an int >= 1 or None (no truncation)")
        if batch_size and batch_size < n and not return_trajectory and x_K is None:
            draw = lambda m: self.sample(m, generator, grad=grad, guide=guide)  # noqa: E731
            return in_batches(n, batch_size, draw)
        device = self.c_x.device
        shape = (n, *self.event_shape)
        with torch.set_grad_enabled(grad):
            x = torch.randn(shape, generator=generator, device=device) if x_K is None else x_K
            states, noises = [x], []
            for k in range(self.steps, 0, -1):
                kk = torch.full((n,), k, dtype=torch.long, device=device)
                noise = torch.randn(shape, generator=generator, device=device)
                noises.append(noise)
                if window is not None and (self.steps - k) % window == 0:
                    x = x.detach()
                if checkpoint and grad:
                    x = torch.utils.checkpoint.checkpoint(
                        self.step, x, kk, noise, use_reentrant=False
                    )
                else:
                    x = self.step(x, kk, noise)
                if guide is not None:
                    x = guide(x, k - 1)
                states.append(x)
        if not return_trajectory:
            return x
        noise = torch.stack(noises[::-1]) if return_noise else None
        return Trajectory(torch.stack(states[::-1]), noise)

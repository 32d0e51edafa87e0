"""Noise schedules of the pretrained model and the short chains sub-sampled from them.

Two objects live here:

* the *full* schedule the eps-network was trained with: ``betas[i]`` for network time
  ``i = 0, ..., T-1`` (``beta_schedule``, ``alpha_bar``);
* a *chain* schedule (``StepSchedule``): the ``alpha_bar`` of the K states ``x_1, ..., x_K`` a
  sampler steps through, and the network time to query at each (``subsample``).

Sub-sampling follows DDIM (Song et al. 2021, uniform / quadratic skips) and FastDPM (Kong & Ping
2021, "On Fast Sampling of Diffusion Probabilistic Models", arXiv:2106.00132; reference code
github.com/FengNiMa/FastDPM_pytorch, ``generate.py``). Everything is computed in float64: the
FastDPM VAR schedule in particular is found by bisection on products of ~1000 factors, which
float32 cannot resolve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("linear", "quadratic", "sigmoid", "cosine")
SUBSAMPLE_KINDS = ("none", "uniform", "trailing", "quadratic", "fastdpm_step", "fastdpm_var")
SPACINGS = ("linear", "quadratic")

# Max cosine beta (Nichol & Dhariwal 2021): avoids a singular final step where alpha_bar -> 0.
_COSINE_MAX_BETA = 0.999


# -- full schedules ----------------------------------------------------------------------------
def beta_schedule(
    name: str,
    steps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
) -> torch.Tensor:
    """The float64 ``[steps]`` beta schedule called ``name`` (one of ``SCHEDULES``).

    * ``linear``: ``linspace(beta_start, beta_end)`` (Ho et al. 2020).
    * ``quadratic``: ``linspace(sqrt(beta_start), sqrt(beta_end)) ** 2``.
    * ``sigmoid``: ``sigmoid(linspace(-6, 6)) * (beta_end - beta_start) + beta_start``
      (the SFT-PG toy code).
    * ``cosine``: Nichol & Dhariwal 2021, Eq. 17 with offset ``cosine_s``; ignores
      ``beta_start`` / ``beta_end``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {SCHEDULES}")
    if steps < 1:
        raise ValueError(f"a beta schedule needs steps >= 1, got {steps}")
    if name == "cosine":
        return _cosine_betas(steps, cosine_s)
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(
            f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}"
        )
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=f64)
    if name == "quadratic":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=f64) ** 2
    return torch.sigmoid(torch.linspace(-6, 6, steps, dtype=f64)) * (beta_end - beta_start) + (
        beta_start
    )


def _cosine_betas(steps: int, s: float) -> torch.Tensor:
    """Betas of ``alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)`` (Nichol & Dhariwal 2021)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    return (1 - ab[1:] / ab[:-1]).clamp(max=_COSINE_MAX_BETA)


def alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """float64 ``cumprod(1 - betas)``: ``alpha_bar[i]`` is the signal level at network time i."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


# -- chain schedules ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors cannot give one bool
class StepSchedule:
    """The K-step chain ``x_K -> ... -> x_0`` as seen by a sampler.

    Attributes:
        alpha_bar: float64 ``[K+1]``; ``alpha_bar[0] = 1`` (data), ``alpha_bar[k]`` the signal
            level of chain state ``x_k``; strictly decreasing.
        net_t: float64 ``[K+1]``; the pretrained eps-network's time input for ``x_k``, a 0-based
            index into the full T-step schedule (fractional for ``fastdpm_var``);
            ``net_t[0] = -1`` is an unused placeholder.
    """

    alpha_bar: torch.Tensor
    net_t: torch.Tensor

    def __post_init__(self) -> None:
        ab, t = self.alpha_bar, self.net_t
        if ab.dtype != torch.float64 or t.dtype != torch.float64:
            raise ValueError(f"StepSchedule needs float64 tensors, got {ab.dtype} and {t.dtype}")
        if ab.dim() != 1 or ab.shape != t.shape or ab.shape[0] < 2:
            raise ValueError(
                "StepSchedule needs 1-D alpha_bar and net_t of the same length K+1 >= 2, got "
                f"shapes {tuple(ab.shape)} and {tuple(t.shape)}"
            )
        if ab[0] != 1.0 or not bool((ab[1:] < ab[:-1]).all()) or not bool((ab[1:] > 0).all()):
            raise ValueError(
                "StepSchedule.alpha_bar must start at 1.0 and decrease strictly, staying > 0"
            )

    @property
    def steps(self) -> int:
        """K, the number of transitions of the chain."""
        return self.alpha_bar.shape[0] - 1

    @property
    def betas(self) -> torch.Tensor:
        """float64 ``[K+1]``: ``betas[k] = 1 - alpha_bar[k] / alpha_bar[k-1]``, ``betas[0] = 0``."""
        ab = self.alpha_bar
        return torch.cat([ab.new_zeros(1), 1 - ab[1:] / ab[:-1]])


def subsample(
    betas: torch.Tensor, steps: int, kind: str = "none", spacing: str = "linear"
) -> StepSchedule:
    """A ``steps``-step chain schedule for a model trained with the full schedule ``betas``.

    Args:
        betas: the full ``[T]`` beta schedule of the pretrained model.
        steps: K, the length of the chain.
        kind: one of ``SUBSAMPLE_KINDS``:
            ``none`` (the full chain, needs ``steps == T``);
            ``uniform`` (``tau = round(linspace(0, T-1, K))``);
            ``trailing`` (``tau_k = round(k T / K) - 1``: starts at the last network time,
            Lin et al. 2024; diffusers' ``timestep_spacing="trailing"``);
            ``quadratic`` (DDIM: ``tau = floor(linspace(0, sqrt(0.8 T), K) ** 2)``);
            ``fastdpm_step`` (FastDPM STEP, a subset of network times, see ``spacing``);
            ``fastdpm_var`` (FastDPM VAR, a short beta sequence with continuous network times).
        spacing: ``linear`` or ``quadratic``; used by the two ``fastdpm_*`` kinds only.

    For the index kinds ``alpha_bar = [1, ab_full[tau_1], ..., ab_full[tau_K]]`` and
    ``net_t = [-1, tau_1, ..., tau_K]``.
    """
    if kind not in SUBSAMPLE_KINDS:
        raise ValueError(f"unknown subsample kind {kind!r}; expected one of {SUBSAMPLE_KINDS}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown subsample spacing {spacing!r}; expected one of {SPACINGS}")
    betas_np = _check_betas(betas)
    T = len(betas_np)
    if steps < 1:
        raise ValueError(f"subsample needs steps >= 1, got {steps}")
    ab_full = np.cumprod(1 - betas_np)

    if kind == "none":
        if steps != T:
            raise ValueError(
                f"subsample kind 'none' keeps all T={T} steps of the model, but steps={steps}; "
                f"use a sub-sampling kind (one of {SUBSAMPLE_KINDS[1:]}) for a shorter chain"
            )
        return _step_schedule(ab_full, np.arange(T, dtype=np.float64))
    if steps > T:
        raise ValueError(
            f"cannot sub-sample {steps} steps from a T={T}-step schedule (need steps <= T)"
        )
    if kind == "fastdpm_var":
        gamma_bar = np.cumprod(1 - _fastdpm_var_noise(betas_np, steps, spacing))
        return _step_schedule(gamma_bar, _fastdpm_var_times(betas_np, gamma_bar))

    if kind == "uniform":
        tau = _uniform_tau(T, steps)
    elif kind == "trailing":
        tau = np.round(np.arange(1, steps + 1) * T / steps).astype(np.int64) - 1
    elif kind == "quadratic" or spacing == "quadratic":
        tau = _quadratic_tau(T, steps)
    else:
        tau = _fastdpm_linear_tau(T, steps)
    _check_tau(tau, T, kind, spacing)
    return _step_schedule(ab_full[tau], tau.astype(np.float64))


def _check_betas(betas: torch.Tensor) -> np.ndarray:
    b = torch.as_tensor(betas).detach().to("cpu", torch.float64).numpy()
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
    if not ((b > 0) & (b < 1)).all():
        raise ValueError("every beta must lie in (0, 1)")
    return b


def _step_schedule(ab: np.ndarray, net_t: np.ndarray) -> StepSchedule:
    """Prepends the data state (``alpha_bar = 1``, ``net_t = -1``) to the K chain states."""
    return StepSchedule(
        alpha_bar=torch.from_numpy(np.concatenate([[1.0], ab])),
        net_t=torch.from_numpy(np.concatenate([[-1.0], net_t])),
    )


def _check_tau(tau: np.ndarray, T: int, kind: str, spacing: str) -> None:
    if (np.diff(tau) <= 0).any() or tau[0] < 0 or tau[-1] > T - 1:
        raise ValueError(
            f"subsample kind {kind!r} (spacing {spacing!r}) gives network times {tau.tolist()} "
            f"for T={T}, steps={len(tau)}, which are not strictly increasing within [0, {T - 1}]; "
            "use fewer steps, a larger T, or kind 'uniform'"
        )


def _uniform_tau(T: int, steps: int) -> np.ndarray:
    """``round(linspace(0, T-1, K))``: evenly spaced network times including both ends."""
    return np.round(np.linspace(0, T - 1, steps)).astype(np.int64)


def _quadratic_tau(T: int, steps: int) -> np.ndarray:
    """DDIM's quadratic skip (``skip_type='quad'``), also FastDPM ``get_STEP_step`` quadratic."""
    return np.floor(np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(np.int64)


def _fastdpm_linear_tau(T: int, steps: int) -> np.ndarray:
    """FastDPM ``get_STEP_step(S, 'linear')``: ``floor(i * c)`` with ``c = (T-1)/(S-1)``.

    The float product is kept as in FastDPM (it can land one below the exact integer
    ``i*(T-1)//(S-1)``, e.g. T=1000, S=200), so the network times match the reference code.
    """
    if steps < 2:
        raise ValueError(f"fastdpm_step with linear spacing needs steps >= 2, got {steps}")
    c = (T - 1.0) / (steps - 1.0)
    return np.floor(np.arange(steps) * c).astype(np.int64)


# -- FastDPM VAR -------------------------------------------------------------------------------
def _bisect(
    f: Callable[[float], float], domain: tuple[float, float], target: float, eps: float
) -> float:
    """FastDPM ``bisearch``: x in ``domain`` with ``target <= f(x) <= (1 +- eps) * target``.

    ``f`` must be decreasing. When the domain does not reach the target the search runs its
    1000 halvings and returns (numerically) the domain end nearest to it, as FastDPM does.
    """
    sign = -1 if target < 0 else 1
    left, right = domain
    x = (left + right) / 2
    for _ in range(1000):
        x = (left + right) / 2
        fx = f(x)
        if fx < target:
            right = x
        elif fx > (1 + sign * eps) * target:
            left = x
        else:
            break
    return x


def _fastdpm_var_noise(betas: np.ndarray, steps: int, spacing: str) -> np.ndarray:
    """FastDPM ``get_VAR_noise``: a short beta sequence eta of length S ending near pure noise.

    ``linear``: ``eta = linspace(beta_0, x, S)``, x in (beta_0, 0.99); ``quadratic``:
    ``eta_i = beta_0 (1 + i x)^2``, x in (0, 0.95 / sqrt(beta_0) / S). x is bisected so that
    ``prod(1 - eta)`` matches the full model's final alpha_bar, as closely as the domain allows.
    """
    beta_0 = float(betas[0])
    target = float(np.prod(1 - betas))
    if spacing == "linear":
        domain = (beta_0, 0.99)

        def g(x: float) -> np.ndarray:
            return np.linspace(beta_0, x, steps)
    else:
        domain = (0.0, 0.95 / np.sqrt(beta_0) / steps)

        def g(x: float) -> np.ndarray:
            return beta_0 * (1 + np.arange(steps) * x) ** 2

    x = _bisect(lambda x: float(np.prod(1 - g(x))), domain, target, eps=1e-4)
    return g(x)


def _log_gamma(x: float) -> float:
    """FastDPM ``_log_gamma``: Stirling's ``log Gamma(x)`` with the ``1 + 1/(12 y)`` correction."""
    y = x - 1
    return np.log(2 * np.pi * y) / 2 + y * (np.log(y) - 1) + np.log(1 + 1 / (12 * y))


def _log_cont_noise(t: float, beta_0: float, beta_T: float, T: int) -> float:
    """FastDPM ``_log_cont_noise``: ``log alpha_bar`` at continuous network time t.

    For a linear schedule ``1 - beta_s = delta * (c - s)`` with ``c = (1 - beta_0) / delta``, so
    ``alpha_bar_t = delta^(t+1) Gamma(c+1) / Gamma(c-t)``, which extends to fractional t.
    """
    delta_beta = (beta_T - beta_0) / (T - 1)
    c = (1.0 - beta_0) / delta_beta
    t_1 = t + 1
    return t_1 * np.log(delta_beta) + _log_gamma(c + 1) - _log_gamma(c - t_1 + 1)


def _fastdpm_var_times(betas: np.ndarray, gamma_bar: np.ndarray) -> np.ndarray:
    """FastDPM ``_precompute_VAR_steps``: the continuous network time of each VAR level.

    ``gamma_bar_k`` is located in the bracket ``ab[i] >= gamma_bar_k > ab[i+1]`` of the full
    schedule and ``_log_cont_noise(t) = log gamma_bar_k`` is bisected over ``(i-0.01, i+1.01)``;
    a level below every bracket gets ``T-1``.
    """
    T = len(betas)
    beta_0, beta_T = float(betas[0]), float(betas[-1])
    # _log_cont_noise is exact only for a linear schedule; elsewhere it is wrong (even NaN).
    if (
        T < 2
        or not beta_T > beta_0
        or not np.allclose(betas, np.linspace(beta_0, beta_T, T), rtol=1e-6, atol=0.0)
    ):
        raise ValueError(
            "subsample kind 'fastdpm_var' maps noise levels to network times with FastDPM's "
            "closed form for a linear, increasing beta schedule; the given betas are not one "
            "(use 'fastdpm_step' or 'uniform')"
        )
    ab = np.cumprod(1 - betas)
    if not (gamma_bar[0] <= ab[0] and gamma_bar[-1] >= ab[-1]):
        raise ValueError("VAR noise levels fall outside the model's schedule")

    def log_alpha_bar(t: float) -> float:
        return _log_cont_noise(t, beta_0, beta_T, T)

    times = np.full(len(gamma_bar), T - 1.0)
    for k, g in enumerate(gamma_bar):
        inside = np.nonzero((ab[:-1] >= g) & (g > ab[1:]))[0]
        if inside.size:
            i = int(inside[0])
            times[k] = _bisect(log_alpha_bar, (i - 0.01, i + 1.01), float(np.log(g)), eps=1e-8)
    return times

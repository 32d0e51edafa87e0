"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, ICML 2023, Alg. 2 and 1).

A consistency function ``f_theta(x, t)`` maps any point of the teacher's probability-flow ODE
trajectory to the trajectory's end, so one evaluation samples. It is distilled from a pretrained
DDPM (the teacher; the student starts as a copy of its eps-net):

    L = E_{n, x, z} d( f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n) )   (L_CD, Sec. 4)

with ``x_{t_{n+1}}`` from the DDPM's forward process, ``x^_{t_n}`` ONE deterministic DDIM step
(eta = 0: the teacher's ODE solver Phi of Sec. 4) from ``t_{n+1}`` to ``t_n``, and ``theta-`` the
target network, ``theta- <- mu theta- + (1 - mu) theta`` after each step (Alg. 2), lambda = 1.
``d``: squared L2 (``distance: l2``, points) or pseudo-Huber ``sqrt(|x - y|^2 + c^2) - c`` with
``c = 0.00054 sqrt(dim)`` (``distance: pseudo_huber``, images; Song & Dhariwal 2023).

Choices for a VP (DDPM) teacher:

* **Grid**: the N discretisation points are N ``uniform`` sub-sampled network times of the
  DDPM's schedule, ``t_1 = 0`` (= t_min, the boundary; ``sigma_min = sigma(0)`` ~ 0.003 for the
  toy sigmoid schedule, close to CM's 0.002) to ``t_N = T - 1``: the teacher is the DDPM's
  N-step DDIM chain (the ``init`` row), its step ``n + 1 -> n`` the ODE step. N = 17 (CD
  used 18): with N = 33 the swiss-roll runs improved for ~6K steps, then diverged.
* **Parameterisation** (Sec. 3): ``f(x, t) = c_skip(t) x + c_out(t) F_theta(x, t)`` with
  ``F_theta`` the student eps-net's x0-prediction ``(x - sqrt(1 - ab) eps) / sqrt(ab)`` and
  EDM's skip weight on the noise level ``sigma(t) = sqrt((1 - ab) / ab)`` (CM, App. C):
  ``c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)``, ``c_out = 1 - c_skip``.
  CM's ``c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)`` scales a raw,
  unit-variance network output; F here is already a denoiser in data units, on which it would
  shrink a one-step sample by sigma_data, so ``c_out = 1 - c_skip`` (at init f is then the
  teacher's denoiser blended towards x near t_min). Boundary: ``f(x, t_min) = x`` exactly.
  ``sigma_data``: a number, or null = measured on the training split at the start of training
  (``diffft.data.base.data_scale``; kept in the checkpoint).
* **Networks**: ``chain.eps_net`` is the online student theta, ``target_net`` theta- (decay
  ``target_decay`` = mu), and with ``ema_decay`` > 0 a slower EMA samples (the released CM
  code's split, where mu only feeds the loss); ``ema_decay: 0`` samples theta.
* **Sampling** (Alg. 1, ``ConsistencySampler``): ``x ~ N(0, I)`` at ``t_N``, ``x <- f(x,
  t_N)``; then per further step re-noise to the next time ``tau`` with the VP forward transition
  from t_min, ``x_tau = sqrt(ab_tau / ab_min) x + sqrt(1 - ab_tau / ab_min) z`` (CM's ``x +
  sqrt(tau^2 - eps^2) z`` for VP), and ``x <- f(x_tau, tau)``. K steps use the grid points
  ``1 + round((N - 1) j / K)``, j = K..1; rows ``cd_K`` for each K of ``nfe``.

Automatic optimisation: one Adam on the student; the target and the EMA follow each step. Every
draw comes from ``batch_generator()`` (reproducible; DDP averages the student's gradients).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from diffft.data.base import data_scale
from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.forward import q_sample
from diffft.diffusion.sampler import in_batches
from diffft.methods.base import check_lr_schedule
from diffft.methods.finetune import FineTuneMethod
from diffft.rows import Row

DISTANCES = ("l2", "pseudo_huber")


def consistency_fn(
    eps_net: torch.nn.Module,
    grid: GaussianChain,
    x: torch.Tensor,
    k: torch.Tensor,
    sigma_data: float | torch.Tensor,
) -> torch.Tensor:
    """``f(x, t_k)`` (Sec. 3) at grid states ``k`` (``[n]``, 1..N; state 1 is t_min)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    ab, ab_min = grid.alpha_bar[k].view(shape), grid.alpha_bar[1]
    sigma, sigma_min = ((1 - ab) / ab).sqrt(), ((1 - ab_min) / ab_min).sqrt()
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    x0_pred = (x - (1 - ab).sqrt() * eps_net(x, grid.net_t[k])) / ab.sqrt()
    return c_skip * x + (1 - c_skip) * x0_pred


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample ``d(a, b)``: squared L2, or pseudo-Huber with c = 0.00054 sqrt(dim)."""
    sq = (a - b).flatten(1).square().sum(1)
    if kind == "l2":
        return sq
    c = 0.00054 * math.sqrt(a[0].numel())
    return (sq + c**2).sqrt() - c


class ConsistencySampler:
    """Multistep consistency sampling (Alg. 1) on ``grid``'s eps-net at the grid states
    ``states`` (decreasing, the first = N); a ``Sampler`` (``diffft.diffusion.sampler``)."""

    def __init__(self, grid: GaussianChain, states: list[int], sigma_data: float) -> None:
        self.grid, self.states, self.sigma_data = grid, states, sigma_data
        self.event_shape = grid.event_shape

    @property
    def device(self) -> torch.device:
        return self.grid.device

    def f(self, x: torch.Tensor, state: int) -> torch.Tensor:
        k = torch.full((x.shape[0],), state, dtype=torch.long, device=x.device)
        return consistency_fn(self.grid.eps_net, self.grid, x, k, self.sigma_data)

    @torch.no_grad()
    def sample(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        return in_batches(n, batch_size, lambda m: self._sample(m, generator))

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        shape, ab = (n, *self.event_shape), self.grid.alpha_bar
        x = self.f(torch.randn(shape, generator=generator, device=self.device), self.states[0])
        for state in self.states[1:]:
            keep = ab[state] / ab[1]  # the forward transition t_min -> tau
            z = torch.randn(shape, generator=generator, device=self.device)
            x = self.f(keep.sqrt() * x + (1 - keep).sqrt() * z, state)
        return x


class ConsistencyDistillation(FineTuneMethod):
    """Args (config keys of ``conf/method/consistency.yaml``; see the module docstring):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the teacher DDPM's checkpoint; empty: the run's ``pretrain`` stage.
    grid_steps: N, the discretisation points (uniform network times, t_1 = 0, t_N = T - 1).
    nfe: the multistep sampling steps offered as rows (the smallest is the main row).
    distance: ``l2`` | ``pseudo_huber``. sigma_data: EDM's data scale (null: measured).
    target_decay: mu of the target network (Alg. 2). ema_decay: the sampling EMA (0: theta).
    optimizer / grad_clip / lr_schedule: the student's (``cosine``: to 0 over the run).
    ddpm: the DDPM's hyper-parameters (filled in from ``init_from``).
    """

    def __init__(
        self,
        event_shape: list[int],
        init_from: str | None = None,
        grid_steps: int = 17,
        nfe: list[int] | None = None,
        distance: str = "l2",
        sigma_data: float | None = None,
        target_decay: float = 0.95,
        ema_decay: float = 0.999,
        optimizer: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        lr_schedule: str = "constant",
        ddpm: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_lr_schedule(lr_schedule)
        nfe = sorted(set(nfe or [1, 2, 4]))
        if distance not in DISTANCES:
            raise ValueError(f"method.distance={distance!r}; expected one of {DISTANCES}")
        if not all(1 <= k < grid_steps for k in nfe):
            raise ValueError(f"method.nfe={nfe}: each must lie in 1..grid_steps-1={grid_steps - 1}")
        if sigma_data is not None and not sigma_data > 0:
            raise ValueError(f"method.sigma_data={sigma_data}: expected a value > 0 or null")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"method.target_decay={target_decay}: expected a value in [0, 1)")
        self.save_hyperparameters()
        # chain: the student theta on the N-point grid; init_chain: the frozen teacher, whose
        # DDIM step n+1 -> n is the ODE solver (Phi, Sec. 4).
        self.build_chain(
            event_shape,
            init_from,
            ddpm,
            {},
            steps=grid_steps,
            subsample="uniform",
            parameterisation="ddim",
            eta=0.0,
        )
        self.target_net = copy.deepcopy(self.chain.eps_net).requires_grad_(False)  # theta- = theta
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data or 0.5)))
        self.init_ema(ema_decay)

    def on_train_start(self) -> None:
        super().on_train_start()
        dm = self.trainer.datamodule
        if self.hparams.sigma_data is None and getattr(dm, "train", None) is not None:
            self.sigma_data.fill_(data_scale(dm.train))  # the same on every rank, and on resume

    # -- Alg. 2 ---------------------------------------------------------------------------------
    def training_step(self, x0: torch.Tensor, batch_idx: int) -> torch.Tensor:
        grid, sd = self.chain, self.sigma_data
        g = self.batch_generator()
        n = torch.randint(1, grid.steps, (x0.shape[0],), generator=g, device=x0.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        x_next = q_sample(x0, grid.alpha_bar[n + 1], noise)  # x_{t_{n+1}}
        with torch.no_grad():
            x_hat = self.init_chain.mean(x_next, n + 1)  # the teacher's DDIM step to t_n
            target = consistency_fn(self.target_net, grid, x_hat, n, sd)
        online = consistency_fn(grid.eps_net, grid, x_next, n + 1, sd)
        loss = distance(online, target, self.hparams.distance).mean()
        self.check_finite(consistency=loss)
        if self.logging_batch():
            self.log("loss/consistency", loss.detach())
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: a checkpoint written at the end of the batch holds it.
        with torch.no_grad():
            target = list(self.target_net.parameters())
            online = list(self.chain.eps_net.parameters())
            torch._foreach_lerp_(target, online, 1.0 - self.hparams.target_decay)  # Alg. 2
        self.update_ema()

    # -- evaluation ------------------------------------------------------------------------------
    def sampler(self, steps: int) -> ConsistencySampler:
        """Alg. 1 with ``steps`` evaluations of f, on the sampling network (EMA or theta)."""
        N = self.chain.steps
        states = [1 + round((N - 1) * j / steps) for j in range(steps, 0, -1)]
        base = self.ema_chain if self.ema_chain is not None else self.chain
        return ConsistencySampler(base, states, float(self.sigma_data))

    @property
    def eval_chain(self) -> ConsistencySampler:  # type: ignore[override]
        """The main row's sampler (what the periodic evaluation samples)."""
        return self.sampler(min(self.hparams.nfe or [1]))

    def rows(self) -> list[Row]:
        """``cd_K`` for each K of ``nfe`` (the smallest is ``main``), and the teacher's N-step
        DDIM chain (``init``: what the student distils, the bound on its quality)."""
        nfe = sorted(set(self.hparams.nfe or [1, 2, 4]))
        rows = [
            Row(
                f"cd_{k}",
                f"consistency {k} steps",
                self.sampler(k),
                nfe=k,
                role="main" if k == nfe[0] else "variant",
            )
            for k in nfe
        ]
        N = self.chain.steps
        init = Row("init", f"DDIM T'={N} (teacher, init)", self.init_chain, role="init", nfe=N)
        return [rows[0], init, *rows[1:]]

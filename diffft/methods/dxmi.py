"""DxMI: maximum-entropy IRL of a diffusion sampler with an energy-based model (Yoon et al.,
NeurIPS 2024, Alg. 1 and 2), and DxDP, its dynamic-programming sampler update, against any
fixed cost.

**Time index.** The paper writes ``x_0`` = noise and ``x_T`` = the sample, a transition
``x_t -> x_{t+1}`` and value functions ``V^t`` with ``V^T = E``. diffft's chain steps
``x_K -> ... -> x_0`` (``x_0`` = the sample, see ``GaussianChain``), so here

    paper t  <->  k = K - t,   paper x_t -> x_{t+1}  <->  x_k -> x_{k-1},   V^t <-> V_k,  V_0 = E,

and the paper's ``s_t`` of the transition out of ``x_t`` is ``s_k`` of the step out of ``x_k``.

**One iteration** (one Lightning batch: one real minibatch) reads like Alg. 1 / 2:

1. roll out ``rollout_batch`` trajectories without gradient (``batch_generator``);
2. AVR (Sec. 4.2): ``s_k^2 <- alpha s_k^2 + (1 - alpha) E||x_k - x_{k-1}||^2 / D``, the batch
   mean all-reduced over DDP ranks (done first, as the released code does; Alg. 1 does it last);
3. energy (Alg. 1 line 4): ``E(data) - E(x_0) + gamma (E(data)^2 + E(x_0)^2)``;
4. value by TD over every transition (Eq. 10): target ``sg[V_{k-1}(x_{k-1})] + running cost``
   (Alg. 1: ``tau1 log pi + tau2 ||x_k - x_{k-1}||^2 / (2 s_k^2)``), or ``+ R(k)`` with a time
   cost (Alg. 2, Eq. 12: ``time_cost: sigmoid | linear | none``); ``td_update: per_step`` takes
   one step per k = 1..K in the paper's order (each target uses the value just updated),
   ``joint`` one step on all transitions at once;
5. sampler (Eq. 11): on ``sampler_batch`` transitions drawn from the trajectories, re-sample
   ``x_{k-1} = mu(x_k) + sigma_k noise`` with the reparameterisation trick and minimise
   ``V_{k-1}(x_{k-1}) - tau1 D log sigma_k + tau2 ||x_k - x_{k-1}||^2 / (2 s_k^2)`` over the
   mean's eps-network and the per-step ``log sigma_k`` (two optimisers, two learning rates).

``running_cost_reduction: sum`` is the paper's formula (sums over the D dimensions);
``mean`` divides both running costs by D, as the released image code does (its sampler loss
is V(x_{t+1}) + tau2 mean_d(dx^2) / (2 s_t^2) - tau1 log sigma_t). ``tau`` sets both
temperatures; ``tau1`` / ``tau2`` (Sec. 4.3) override it.

**Value and energy** (``method.cost``, a module of ``diffft.methods.costs`` picked by its
``_target_``; each gives ``V_k(x)`` for k = 0..K with ``V_0 = E`` and owns its networks):
``SharedTimeValue`` (Alg. 1, 2-D: one time-conditioned net, ``E = V(., 0)`` of K + 1 steps),
``TimeIndependentValue`` (Alg. 2, images: ``V(x)`` for every step, ``E = V``, with ``time_cost:
sigmoid``), both training the energy with the value's optimiser; ``SeparateEnergyValue`` (an
energy network with its own optimiser, ``V_0 = E`` still closes the recursion). **DxDP**:
``FixedReward``, a *fixed* terminal cost (any callable on points ``[n, D] -> [n]``, or a class
building one; ``reward_is: reward`` minimises its negative); the energy step is then skipped and
only the value and the sampler train.

**Value guidance** (Sec. 5.2) at sampling time, with the paper's sign: after each step
``x_{k-1} <- x_{k-1} - lambda sigma_k grad V_{k-1}(x_{k-1})`` (descend the cost-to-go; the
released code has the opposite sign): ``guidance: [0.5]`` adds a row per lambda.

DDP: each rank rolls out its own trajectories and draws its own transitions; the gradients of
every part are averaged at each ``manual_backward``; the AVR statistic is all-reduced, so
``avr_s2`` stays identical on every rank without a broadcast. The effective batches are
``dataset.batch_size``, ``rollout_batch`` and ``sampler_batch`` x ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.methods.base import check_lr_schedule
from diffft.methods.costs import LEGACY_PREFIXES, build_cost, cost_config_of
from diffft.methods.diagnostics import sample_diagnostics, sigma_logs
from diffft.methods.finetune import FineTuneMethod
from diffft.methods.losses import (
    avr_update,
    energy_loss,
    entropy_cost,
    running_cost,
    td_loss,
)
from diffft.rows import Row

REDUCTIONS = ("sum", "mean")
TD_UPDATES = ("joint", "per_step")
AVR_INITS = ("sigma", "beta")


class DxMI(FineTuneMethod):
    """Args (config keys of ``conf/method/dxmi.yaml`` / ``dxdp.yaml``):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the DDPM checkpoint the chain starts from.
    sampler: the T-step chain (``steps``, ``subsample``; ``learn_sigma`` is always on).
    fresh_sampler: keep the DDPM's architecture and schedule but start from random weights
        (Table 1's "no pretraining" row).
    cost: the cost-to-go, ``{_target_: diffft.methods.costs.NAME, ...}``: its value (and energy)
        networks, or DxDP's fixed reward, and the time cost (null: running costs in the TD
        target, Alg. 1; sigmoid | linear | none: Alg. 2, Eq. 12). See diffft.methods.costs.
    tau / tau1 / tau2: temperatures (entropy / velocity); gamma: squared-energy weight.
    running_cost_reduction: ``sum`` (paper) | ``mean`` (released code: / D).
    td_update: ``joint`` | ``per_step``. avr_alpha: AVR EMA (1 = s_k fixed).
    avr_init: ``sigma`` (s_k = sigma_k, Alg. 1) | ``beta`` (s_k^2 = the forward beta of the
        step, the released code).
    rollout_batch: trajectories per iteration; sampler_batch: transitions per sampler step (an
        int, or ``all``).
    lr: ``{sampler, sigma, value, energy}``; optimizer: shared optimiser config; lr_schedule:
        ``constant`` | ``cosine`` (every part, to 0 over the run's batches; Lightning schedulers,
        ``lr_schedule_config``).
    grad_clip: max gradient norm of the sampler (mean and sigma; None = off).
    guidance: value-guidance lambdas reported as extra rows. ema_decay: EMA of the sampler.
    grad_chunk: transitions per backward pass of the TD and sampler updates (None: all at
        once); gradients accumulate over the chunks (``manual_step``): the same update in about
        one chunk's memory (image rollouts).
    ddpm: the DDPM's hyper-parameters (filled in from ``init_from``).
    """

    def __init__(
        self,
        event_shape: list[int],
        sampler: dict[str, Any],
        cost: dict[str, Any],
        init_from: str | None = None,
        fresh_sampler: bool = False,
        tau: float = 0.1,
        tau1: float | None = None,
        tau2: float | None = None,
        gamma: float = 1.0,
        running_cost_reduction: str = "sum",
        td_update: str = "joint",
        avr_alpha: float = 0.99,
        avr_init: str = "sigma",
        rollout_batch: int = 64,
        sampler_batch: int | str = 64,
        lr: dict[str, float] | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_schedule: str = "cosine",
        grad_clip: float | None = None,
        guidance: list[float] | None = None,
        ema_decay: float = 0.0,
        grad_chunk: int | None = None,
        ddpm: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for key, val, allowed in (
            ("running_cost_reduction", running_cost_reduction, REDUCTIONS),
            ("td_update", td_update, TD_UPDATES),
            ("avr_init", avr_init, AVR_INITS),
        ):
            if val not in allowed:
                raise ValueError(f"method.{key}={val!r}; expected one of {allowed}")
        if sampler_batch != "all" and not (isinstance(sampler_batch, int) and sampler_batch > 0):
            raise ValueError(
                f"method.sampler_batch={sampler_batch!r}; expected an int > 0 or 'all'"
            )
        if not 0.0 <= avr_alpha <= 1.0:
            raise ValueError(f"method.avr_alpha={avr_alpha}; expected a value in [0, 1]")
        check_lr_schedule(lr_schedule)
        self.automatic_optimization = False
        self.save_hyperparameters()
        self.tau1 = tau if tau1 is None else tau1
        self.tau2 = tau if tau2 is None else tau2
        chain = self.build_chain(event_shape, init_from, ddpm, dict(sampler), learn_sigma=True)
        if fresh_sampler and ddpm is None:  # random weights, same architecture and schedule
            fresh = self.ddpm_from_hparams(self.hparams["ddpm"]).chain.eps_net
            chain.eps_net.load_state_dict(fresh.state_dict())
            self.init_chain.eps_net.load_state_dict(fresh.state_dict())
        self.cost = build_cost(cost, event_shape, chain.steps)
        # AVR's s_k^2 (index k = 1..K; 0 unused), in the checkpoint.
        if avr_init == "sigma":
            s2 = chain.fixed_sigma.square().clone()
        else:
            ab = chain.alpha_bar
            s2 = torch.cat([torch.ones(1), 1 - ab[1:] / ab[:-1]])
        s2[0] = 1.0
        self.register_buffer("avr_s2", s2)
        self.init_ema(ema_decay)

    # -- energy and value (the cost module's) --------------------------------------------------
    @property
    def learns_energy(self) -> bool:
        return self.cost.energy is not None

    def energy_fn(self, x: torch.Tensor) -> torch.Tensor:
        """The terminal cost ``E(x) = V_0(x)`` per point, shape ``[n]`` (low on data)."""
        return self.cost.terminal(x)

    def value_fn(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``V_k(x)`` per point (k a LongTensor in 0..K), with ``V_0 = E``: shape ``[n]``."""
        return self.cost.value(x, k)

    # -- optimisers -------------------------------------------------------------------------
    def _parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser: the sampler's mean and sigma, then the cost module's value
        (and energy, when it is a separate network)."""
        return {
            "sampler": list(self.chain.eps_net.parameters()),
            "sigma": [self.chain.log_sigma],
            **self.cost.parts(),
        }

    def _base_lr(self, part: str) -> float:
        defaults = {"sampler": 1e-3, "sigma": 1e-2, "value": 1e-3, "energy": 1e-3}
        return (self.hparams.lr or {}).get(part, defaults[part])

    def configure_optimizers(self) -> Any:
        """One optimiser per part: sampler mean, sigma, value (and the energy when it is a
        separate network), in that order, each with its ``lr_schedule``."""
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam"}
        opts = [
            instantiate(opt, params=params, lr=self._base_lr(part))
            for part, params in self._parts().items()
        ]
        return self.lr_schedule_config(opts, self.hparams.lr_schedule)

    def _optimizers(self) -> dict[str, Any]:
        return dict(zip(self._parts(), self.optimizers(), strict=True))

    def optimizer_steps_per_batch(self) -> int:
        """Optimiser steps of one iteration (what Lightning's ``global_step`` and
        ``trainer.max_steps`` count under manual optimisation): sampler + sigma, the TD steps,
        and the energy step."""
        td = self.chain.steps if self.hparams.td_update == "per_step" else 1
        return 2 + td + int(self.learns_energy)

    def batches_for_steps(self, steps: int) -> int:
        return -(-steps // self.optimizer_steps_per_batch())

    # -- Alg. 1 / 2 ---------------------------------------------------------------------------
    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        hp = self.hparams
        opts = self._optimizers()
        g = self.batch_generator()  # this rank's stream of this batch: rollout, picks, noise
        traj = self.chain.sample(
            hp.rollout_batch, generator=g, return_trajectory=True, return_noise=True
        )
        x_k, x_prev, k = traj.transitions()  # k = 1..K, blocks of rollout_batch
        sq_step = (x_k - x_prev).flatten(1).square().sum(1)  # ||x_k - x_{k-1}||^2
        self.avr_step(sq_step)
        logs: dict[str, torch.Tensor] = {}
        if self.learns_energy:
            logs |= self.energy_step(real, traj.sample, opts.get("energy", opts["value"]))
        noise = traj.transition_noise()
        logs |= self.value_step(x_k, x_prev, k, sq_step, noise, opts["value"])
        logs |= self.sampler_step(x_k, k, [opts["sampler"], opts["sigma"]], g)
        self.step_lr_schedulers()
        self.update_ema()
        if self.logging_batch():
            logs |= sigma_logs(self.chain.log_sigma_table())
            self.log_dict(logs)

    @torch.no_grad()
    def avr_step(self, sq_step: torch.Tensor) -> None:
        """AVR with the rollout's mean squared step per k (all-reduced under DDP)."""
        K, D = self.chain.steps, math.prod(self.chain.event_shape)
        mean_sq = sq_step.view(K, -1).mean(1) / D
        if self._trainer is not None and self.trainer.world_size > 1:
            mean_sq = self.trainer.strategy.reduce(mean_sq, reduce_op="mean")
        self.avr_s2[1:] = avr_update(self.avr_s2[1:], mean_sq, self.hparams.avr_alpha)

    def energy_step(self, real: torch.Tensor, fake: torch.Tensor, opt: Any) -> dict:
        e_real, e_fake = self.energy_fn(real), self.energy_fn(fake)
        loss = energy_loss(e_real, e_fake, self.hparams.gamma)
        self.manual_step([opt], loss, part="energy")
        logs = {"loss/energy": loss.detach(), "energy/data": e_real.detach().mean(),
                "energy/samples": e_fake.detach().mean()}  # fmt: skip
        if self.logging_batch():
            logs |= sample_diagnostics(real, fake, e_fake.reshape(-1))
        return logs

    def transition_cost(
        self, k: torch.Tensor, sq_step: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The cost of each transition in the TD target: the running costs (Alg. 1; log pi from
        the rollout's own noise, no second eps-network pass) or the time cost R(k) (Alg. 2)."""
        if self.cost.time_costs is not None:
            return self.cost.time_costs[k]
        with torch.no_grad():
            log_prob = self.chain.log_prob_of_noise(noise, k)
        D = math.prod(self.chain.event_shape)
        reduction = self.hparams.running_cost_reduction
        s2 = self.avr_s2[k]
        return running_cost(log_prob, sq_step, s2, self.tau1, self.tau2, D, reduction)

    def value_step(
        self,
        x_k: torch.Tensor,
        x_prev: torch.Tensor,
        k: torch.Tensor,
        sq_step: torch.Tensor,
        noise: torch.Tensor,
        opt: Any,
    ) -> dict:
        """TD (Eq. 10 / 12) over every transition of the rollout."""
        cost = self.transition_cost(k, sq_step, noise)
        if self.hparams.td_update == "joint":
            blocks = [slice(None)]
        else:  # k = 1, ..., K: the paper's t = T-1, ..., 0
            blocks = self.chunks(x_k.shape[0], x_k.shape[0] // self.chain.steps)
        for block in blocks:
            idx = torch.arange(x_k.shape[0], device=x_k.device)[block]

            def loss_of(b: slice, idx: torch.Tensor = idx) -> torch.Tensor:
                i = idx[b]
                with torch.no_grad():
                    target = self.value_fn(x_prev[i], k[i] - 1) + cost[i]
                return td_loss(self.value_fn(x_k[i], k[i]), target)

            chunk = self.hparams.grad_chunk
            loss = self.manual_step([opt], loss_of, n=idx.numel(), chunk=chunk, part="value")
        return {"loss/td": loss}

    def sampler_step(
        self, x_k: torch.Tensor, k: torch.Tensor, opts: list[Any], g: torch.Generator
    ) -> dict:
        """Eq. 11 with the reparameterisation trick on transitions drawn from the rollout."""
        hp = self.hparams
        n = x_k.shape[0]
        m = n if hp.sampler_batch == "all" else min(hp.sampler_batch, n)
        idx = torch.randperm(n, generator=g, device=x_k.device)[:m]
        x_k, k = x_k[idx], k[idx]
        noise = torch.randn(x_k.shape, generator=g, device=x_k.device)
        D = math.prod(self.chain.event_shape)
        v_sum = torch.zeros((), device=x_k.device)

        def loss_of(b: slice) -> torch.Tensor:
            nonlocal v_sum
            x_new = self.chain.step(x_k[b], k[b], noise[b])
            sq = (x_k[b] - x_new).flatten(1).square().sum(1)
            entropy = entropy_cost(self.chain.log_sigma_table()[k[b]], D)
            costs = running_cost(
                entropy, sq, self.avr_s2[k[b]], self.tau1, self.tau2, D, hp.running_cost_reduction
            )
            v_next = self.value_fn(x_new, k[b] - 1)
            v_sum = v_sum + v_next.detach().sum()
            return (v_next + costs).mean()

        loss = self.manual_step(
            opts,
            loss_of,
            n=m,
            chunk=hp.grad_chunk,
            part="sampler",
            clip=hp.grad_clip,
            log_grad_norm=True,
        )
        return {"loss/sampler": loss, "value/next": v_sum / m}

    # -- checkpoints from before method.cost ----------------------------------------------------
    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's hyper-parameters from before ``method.cost`` (``value``, ``energy``,
        ``reward``, ``time_dependent``, ``time_cost``, ... at the top level) in the new form."""
        if "cost" in hparams or "value" not in hparams:
            return hparams
        old = ("value", "energy", "reward", "reward_is", "time_dependent", "time_cost")
        new = {k: v for k, v in hparams.items() if k not in (*old, "time_cost_c")}
        return {**new, "cost": cost_config_of(hparams)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Networks saved before method.cost (``value.*``, ``energy.*``, ``reward_fn.*``) are
        # the cost module's now.
        state = checkpoint.get("state_dict", {})
        for key in list(state):
            for old, new in LEGACY_PREFIXES.items():
                if key.startswith(old):
                    state[new + key[len(old) :]] = state.pop(key)

    # -- evaluation ---------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return "DxMI" if self.learns_energy else "DxDP"

    def rows(self) -> list[Row]:
        """The trained sampler (id ``dxmi``, or ``dxdp``; its learned energy scored by the
        energy metrics), one value-guided variant per ``guidance`` λ (``guided_λ``), the init."""
        K, name = self.chain.steps, self.method_name
        energy = self.energy_fn if self.learns_energy else None
        out = [Row(name.lower(), f"{name} T={K}", self.eval_chain, energy=energy)]
        for lam in self.hparams.guidance or []:
            guided = ValueGuided(self.eval_chain, self.value_fn, float(lam))
            label = f"{name} T={K} + value guidance λ={lam}"
            out.append(Row(f"guided_{lam}", label, guided, role="variant"))
        out.append(Row("init", f"DDPM T={K} (init)", self.init_chain, role="init"))
        return out

    def extra_plots(self, out: Path, data: torch.Tensor, samples: torch.Tensor) -> list[Path]:
        """2-D: the energy with samples on top (Fig. 2) and the value at every step (Fig. 3)."""
        if self.chain.event_shape != (2,):
            return []
        from diffft.plots import energy_map, value_maps

        name, K, dev = self.method_name, self.chain.steps, self.device
        return [
            energy_map(self.energy_fn, data, samples, out / "energy.png", name, dev),
            value_maps(self.value_fn, K, data, out / "values.png", dev),
        ]


class ValueGuided(nn.Module):
    """A chain sampled with value guidance: ``x_{k-1} <- x_{k-1} - lambda sigma_k grad
    V_{k-1}(x_{k-1})`` after every step (the paper's sign: towards a lower cost-to-go)."""

    def __init__(
        self,
        chain: GaussianChain,
        value_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lam: float,
    ) -> None:
        super().__init__()
        self.chain, self.value_fn, self.lam = chain, value_fn, lam
        self.event_shape = chain.event_shape

    @property
    def device(self) -> torch.device:
        return self.chain.device

    def guide(self, x: torch.Tensor, k: int) -> torch.Tensor:
        kk = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        sigma = self.chain.sigma(kk + 1).detach()  # the step just taken: x_{k+1} -> x_k
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value_fn(xg, kk).sum(), xg)
        return (x - self.lam * sigma * grad).detach()

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        return self.chain.sample(n, generator, batch_size=batch_size, guide=self.guide)

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

**Value and energy.** ``time_dependent: true`` (Alg. 1, 2-D): ``value`` is a time-conditioned
net ``V(x, k)``; ``false`` (Alg. 2, images): ``V(x)`` for every step. ``energy: null`` shares
the energy with the value (the paper's setups: ``E = V(., 0)`` of a time-dependent value with
K + 1 steps, or ``E = V``); its energy and TD steps then share the value's optimiser. ``energy:
{_target_: ...}`` is a separate network with its own optimiser, and ``V_0 = E`` still closes the
recursion. **DxDP**: ``reward: {_target_: pkg.fn}`` is a *fixed* terminal cost (any callable on
points ``[n, D] -> [n]``, or a class building one; ``reward_is: reward`` minimises its negative);
the energy step is then skipped and only the value and the sampler train.

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
from hydra.utils import get_object, instantiate
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.methods.diagnostics import sample_diagnostics, sigma_logs
from diffft.methods.finetune import FineTuneMethod
from diffft.methods.losses import (
    avr_update,
    energy_loss,
    entropy_cost,
    running_cost,
    td_loss,
    time_cost,
)

REDUCTIONS = ("sum", "mean")
TD_UPDATES = ("joint", "per_step")
LR_SCHEDULES = ("constant", "cosine")
AVR_INITS = ("sigma", "beta")


def build_reward(cfg: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed cost ``[n, D] -> [n]`` from ``{_target_: pkg.fn, **kwargs}``: a function gets
    the kwargs bound (``functools.partial``), a class is instantiated with them."""
    cfg = dict(cfg)
    if "_target_" not in cfg:
        raise ValueError(f"method.reward={cfg}: expected {{_target_: my_pkg.my_cost, ...}}")
    try:
        target = get_object(cfg["_target_"])
    except Exception as err:  # hydra wraps the ImportError
        raise ValueError(
            f"method.reward._target_='{cfg['_target_']}' cannot be imported: {err}"
        ) from None
    if isinstance(target, type):
        module = instantiate(cfg)
        return module.requires_grad_(False) if isinstance(module, nn.Module) else module
    return instantiate(cfg, _partial_=True)


class DxMI(FineTuneMethod):
    """Args (config keys of ``conf/method/dxmi.yaml`` / ``dxdp.yaml``):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the DDPM checkpoint the chain starts from.
    sampler: the T-step chain (``steps``, ``subsample``; ``learn_sigma`` is always on).
    fresh_sampler: keep the DDPM's architecture and schedule but start from random weights
        (Table 1's "no pretraining" row).
    value: the value network config. time_dependent: ``V(x, k)`` (Alg. 1) or ``V(x)`` (Alg. 2).
    energy: the energy network config, or null: shared with the value (see the module doc).
    reward: a fixed cost instead of a learned energy (DxDP). reward_is: ``cost`` | ``reward``.
    tau / tau1 / tau2: temperatures (entropy / velocity); gamma: squared-energy weight.
    time_cost: null (running costs in the TD target, Alg. 1) or sigmoid | linear | none
        (Alg. 2, Eq. 12); time_cost_c: the linear cost c.
    running_cost_reduction: ``sum`` (paper) | ``mean`` (released code: / D).
    td_update: ``joint`` | ``per_step``. avr_alpha: AVR EMA (1 = s_k fixed).
    avr_init: ``sigma`` (s_k = sigma_k, Alg. 1) | ``beta`` (s_k^2 = the forward beta of the
        step, the released code).
    rollout_batch: trajectories per iteration; sampler_batch: transitions per sampler step (an
        int, or ``all``).
    lr: ``{sampler, sigma, value, energy}``; optimizer: shared optimiser config; lr_schedule:
        ``constant`` | ``cosine`` (every part, to 0 over the run's batches).
    grad_clip: max gradient norm of the sampler (mean and sigma; None = off).
    guidance: value-guidance lambdas reported as extra rows. ema_decay: EMA of the sampler.
    grad_chunk: transitions per backward pass of the TD and sampler updates (None: all at
        once); gradients accumulate over the chunks (``accumulate``): the same update in about
        one chunk's memory (image rollouts).
    ddpm: the DDPM's hyper-parameters (filled in from ``init_from``).
    """

    def __init__(
        self,
        event_shape: list[int],
        sampler: dict[str, Any],
        value: dict[str, Any],
        energy: dict[str, Any] | None = None,
        reward: dict[str, Any] | None = None,
        reward_is: str = "cost",
        init_from: str | None = None,
        fresh_sampler: bool = False,
        time_dependent: bool = True,
        tau: float = 0.1,
        tau1: float | None = None,
        tau2: float | None = None,
        gamma: float = 1.0,
        time_cost: str | None = None,
        time_cost_c: float = 0.05,
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
            ("lr_schedule", lr_schedule, LR_SCHEDULES),
            ("avr_init", avr_init, AVR_INITS),
            ("reward_is", reward_is, ("cost", "reward")),
        ):
            if val not in allowed:
                raise ValueError(f"method.{key}={val!r}; expected one of {allowed}")
        if sampler_batch != "all" and not (isinstance(sampler_batch, int) and sampler_batch > 0):
            raise ValueError(
                f"method.sampler_batch={sampler_batch!r}; expected an int > 0 or 'all'"
            )
        if not 0.0 <= avr_alpha <= 1.0:
            raise ValueError(f"method.avr_alpha={avr_alpha}; expected a value in [0, 1]")
        self.automatic_optimization = False
        self.save_hyperparameters()
        self.tau1 = tau if tau1 is None else tau1
        self.tau2 = tau if tau2 is None else tau2
        chain = self.build_chain(event_shape, init_from, ddpm, dict(sampler), learn_sigma=True)
        if fresh_sampler and ddpm is None:  # random weights, same architecture and schedule
            fresh = self.ddpm_from_hparams(self.hparams["ddpm"]).chain.eps_net
            chain.eps_net.load_state_dict(fresh.state_dict())
            self.init_chain.eps_net.load_state_dict(fresh.state_dict())
        K = chain.steps
        self.reward_fn = build_reward(reward) if reward is not None else None
        self.shared_energy = energy is None and reward is None
        if time_dependent:
            n_steps = K + 1 if self.shared_energy else K  # index k (shared) or k - 1
            self.value = instantiate(value, event_shape=event_shape, n_steps=n_steps)
        elif "TimeMLP" in str(value.get("_target_", "")):
            raise ValueError(
                "method.time_dependent=false needs a value network without a time input: set "
                "method.value._target_=diffft.nets.mlp.MLP (or your own net of x alone)"
            )
        else:
            self.value = instantiate(value, event_shape=event_shape)
        own_energy = energy is not None and reward is None
        self.energy = instantiate(energy, event_shape=event_shape) if own_energy else None
        self.register_buffer(
            "time_costs", time_cost_table(time_cost, K, time_cost_c), persistent=False
        )
        # AVR's s_k^2 (index k = 1..K; 0 unused), in the checkpoint.
        if avr_init == "sigma":
            s2 = chain.fixed_sigma.square().clone()
        else:
            ab = chain.alpha_bar
            s2 = torch.cat([torch.ones(1), 1 - ab[1:] / ab[:-1]])
        s2[0] = 1.0
        self.register_buffer("avr_s2", s2)
        self.init_ema(ema_decay)

    # -- energy and value ---------------------------------------------------------------------
    @property
    def learns_energy(self) -> bool:
        return self.reward_fn is None

    def energy_fn(self, x: torch.Tensor) -> torch.Tensor:
        """The terminal cost ``E(x)`` per point, shape ``[n]`` (low on data)."""
        if self.reward_fn is not None:
            r = self.reward_fn(x).reshape(x.shape[0])
            return r if self.hparams.reward_is == "cost" else -r
        if self.energy is not None:
            return self.energy(x).reshape(x.shape[0])
        if self.hparams.time_dependent:
            return self.value(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).view(
                -1
            )
        return self.value(x).view(-1)

    def value_fn(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``V_k(x)`` per point (k a LongTensor in 0..K), with ``V_0 = E``: shape ``[n]``."""
        if self.shared_energy and self.hparams.time_dependent:
            return self.value(x, k).view(-1)  # index 0 is the energy
        if self.shared_energy:
            return self.value(x).view(-1)  # E = V
        last = k == 0
        if bool(last.all()):
            return self.energy_fn(x)
        if not bool(last.any()):
            return self._value(x, k)
        i0, i1 = last.nonzero().view(-1), (~last).nonzero().view(-1)
        vals = torch.cat([self.energy_fn(x[i0]), self._value(x[i1], k[i1])])
        return vals[torch.argsort(torch.cat([i0, i1]))]

    def _value(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.hparams.time_dependent:
            return self.value(x, k - 1).view(-1)
        return self.value(x).view(-1)

    # -- optimisers -------------------------------------------------------------------------
    def _parts(self) -> dict[str, list[nn.Parameter]]:
        parts = {
            "sampler": list(self.chain.eps_net.parameters()),
            "sigma": [self.chain.log_sigma],
            "value": list(self.value.parameters()),
        }
        if self.energy is not None:
            parts["energy"] = list(self.energy.parameters())
        return parts

    def _base_lr(self, part: str) -> float:
        defaults = {"sampler": 1e-3, "sigma": 1e-2, "value": 1e-3, "energy": 1e-3}
        return (self.hparams.lr or {}).get(part, defaults[part])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser per part: sampler mean, sigma, value (and the energy when it is a
        separate network), in that order."""
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam"}
        return [
            instantiate(opt, params=params, lr=self._base_lr(part))
            for part, params in self._parts().items()
        ]

    def _optimizers(self) -> dict[str, Any]:
        return dict(zip(self._parts(), self.optimizers(), strict=True))

    def optimizer_steps_per_batch(self) -> int:
        """Optimiser steps of one iteration (what Lightning's ``global_step`` and
        ``trainer.max_steps`` count under manual optimisation): sampler + sigma, the TD steps,
        and the energy step."""
        td = self.chain.steps if self.hparams.td_update == "per_step" else 1
        return 2 + td + int(self.learns_energy)

    def total_batches(self) -> int:
        """The run's iterations: ``max_epochs`` x batches per epoch, or fewer when
        ``trainer.max_steps`` (optimiser steps) stops it first."""
        trainer = self.trainer
        totals = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            totals.append(trainer.max_epochs * trainer.num_training_batches)
        if trainer.max_steps != -1:
            totals.append(-(-trainer.max_steps // self.optimizer_steps_per_batch()))
        total = min(totals, default=0)
        if not 0 < total < 10**9:
            raise ValueError(
                "method.lr_schedule=cosine decays over the run's iterations: set "
                "trainer.max_epochs (or trainer.max_steps), or method.lr_schedule=constant"
            )
        return int(total)

    def _set_learning_rates(self, opts: dict[str, Any]) -> None:
        if self.hparams.lr_schedule != "cosine":
            return
        total = self.total_batches()
        factor = 0.5 * (1 + math.cos(math.pi * min(self.batches_done - 1, total) / total))
        for part, opt in opts.items():
            for group in opt.optimizer.param_groups:
                group["lr"] = self._base_lr(part) * factor

    def _step(self, opts: list[Any], loss: torch.Tensor) -> None:
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        sampler_opts = self.optimizers()[:2]
        if not any(optimizer is o.optimizer for o in sampler_opts):
            return
        if optimizer is sampler_opts[0].optimizer:
            self.log_grad_norm(optimizer)
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, self.hparams.grad_clip, "norm")

    # -- Alg. 1 / 2 ---------------------------------------------------------------------------
    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        hp = self.hparams
        opts = self._optimizers()
        self._set_learning_rates(opts)
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
        self.iteration += 1
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
        self.check_finite(energy=loss)
        self._step([opt], loss)
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
        if self.time_costs is not None:
            return self.time_costs[k]
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

            loss = self.accumulate([opt], idx.numel(), loss_of, self.hparams.grad_chunk, "value")
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

        loss = self.accumulate(opts, m, loss_of, hp.grad_chunk, "sampler")
        return {"loss/sampler": loss, "value/next": v_sum / m}

    # -- evaluation ---------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return "DxMI" if self.learns_energy else "DxDP"

    def samplers(self) -> dict[str, Any]:
        K = self.chain.steps
        out: dict[str, Any] = {f"{self.method_name} T={K}": self.eval_chain}
        for lam in self.hparams.guidance or []:
            out[f"{self.method_name} T={K} + value guidance λ={lam}"] = ValueGuided(
                self.eval_chain, self.value_fn, float(lam)
            )
        out[f"DDPM T={K} (init)"] = self.init_chain
        return out

    def energies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Rows whose energy the energy metrics (AUC) score: the learned energy of this run."""
        if not self.learns_energy:
            return {}
        return {f"{self.method_name} T={self.chain.steps}": self.energy_fn}

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


def time_cost_table(kind: str | None, steps: int, c: float) -> torch.Tensor | None:
    return None if kind is None else time_cost(kind, steps, c)


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

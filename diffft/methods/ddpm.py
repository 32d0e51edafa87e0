"""DDPM pretraining (Ho et al. 2020): the eps-network every fine-tuning method starts from.

Training minimises the denoising loss (Eq. 14) over the full T-step schedule; evaluation
samples with the T-step ancestral chain and, optionally, with sub-sampled T'-step chains
(``eval_steps``), the "DDPM T'" rows of the papers' tables.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.sampler import SchedulerSampler
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.methods.base import SamplerMethod, check_lr_schedule
from diffft.rows import Row


class DDPM(SamplerMethod):
    """Args (all config keys of ``conf/method/ddpm.yaml``):
    backbone: eps-network config (``_target_`` + kwargs; ``event_shape`` and ``n_steps`` are
    filled in). event_shape: the shape of one sample (``[D]`` for points, ``[C, H, W]`` for
    images; ``dataset.event_shape``, filled in from the data).
    schedule: ``beta_schedule`` kwargs (name, steps, beta_start, beta_end).
    sampler: ``GaussianChain`` kwargs of the evaluation chain (parameterisation, variance, eta).
    optimizer: optimiser config (``_target_`` + kwargs). grad_clip: max grad norm (None = off).
    lr_schedule: ``constant``, or ``cosine`` (decay to 0 over the run's optimiser steps).
    ema_decay: EMA of the eps-network (0 = off). eval_steps: extra short samplers to report,
    each ``{steps: T', subsample: kind}`` (a sub-sampled chain; other ``GaussianChain`` keys such
    as ``spacing``, ``variance``, ``sigma_last`` override the model's sampler and are named in
    the row's label) or ``{steps: T', solver: ddim|dpmpp2m}`` (a diffusers solver on this
    eps-network). antithetic: pair t with T-1-t.

    Under DDP each rank takes ``dataset.batch_size`` rows of its own shard with its own t and
    noise, and the gradients are averaged: the effective batch is ``dataset.batch_size`` x
    ranks (``effective_batch`` in the run's ``config.yaml``).
    """

    @classmethod
    def ddpm_steps(cls, cfg: dict[str, Any]) -> int | None:
        return int(cfg["schedule"]["steps"])

    def __init__(
        self,
        backbone: dict[str, Any],
        event_shape: list[int],
        schedule: dict[str, Any],
        optimizer: dict[str, Any],
        sampler: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.999,
        eval_steps: list[dict[str, Any]] | None = None,
        antithetic: bool = True,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        check_lr_schedule(lr_schedule)
        self.save_hyperparameters()
        betas = beta_schedule(**schedule)
        self.register_buffer("betas", betas)  # float64: sub-sampling needs the exact schedule
        self.register_buffer("alpha_bar_full", alpha_bar(betas).float())
        self.event_shape = tuple(int(d) for d in event_shape)
        eps_net = instantiate(backbone, event_shape=list(self.event_shape), n_steps=len(betas))
        schedule = subsample(betas, len(betas))
        self.chain = GaussianChain(eps_net, schedule, self.event_shape, **(sampler or {}))
        self.init_ema(ema_decay)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = denoising_loss(
            self.chain.eps_net,
            batch,
            self.alpha_bar_full,
            generator=self.batch_generator(),  # t and noise: this rank's stream of this batch
            antithetic=self.hparams.antithetic,
        )
        self.check_finite(denoising=loss)
        if self.logging_batch():
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: a checkpoint saved by a callback at the end of this
        # batch then holds this batch's EMA update (exact resume).
        self.update_ema()

    def configure_optimizers(self) -> Any:
        opt = instantiate(self.hparams.optimizer, params=self.chain.parameters())
        if self.hparams.lr_schedule == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if not 0 < total < 10**9:
            raise ValueError(
                "method.lr_schedule=cosine needs a finite run: set trainer.max_steps or max_epochs"
            )
        # torch's CosineAnnealingLR over optimiser steps (its recursive form, whose state the
        # DDPM checkpoints hold), not the fine-tuning methods' closed-form LambdaLR: the two
        # differ in the last bits, and the cached pretrained DDPMs were trained with this one.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.hparams.lr_schedule != "cosine":
            return
        sched, total = self.lr_schedulers(), int(self.trainer.estimated_stepping_batches)
        if sched.T_max != total:  # restored from a checkpoint of a run with another length
            rank_zero_warn(
                f"method.lr_schedule=cosine: the resumed schedule decays over {sched.T_max} steps "
                f"but this run has {total}; the learning rate follows the old schedule (and "
                "rises again after it). Resume with the original trainer.max_steps, or fine-tune "
                "from the checkpoint with a new run instead."
            )

    def short_chain(
        self, steps: int, subsample_kind: str = "none", **sampler: Any
    ) -> GaussianChain:
        """A T'-step chain on (a copy of) the evaluated eps-network; ``sampler`` overrides the
        chain kwargs this model was trained with."""
        net = copy.deepcopy(self.eval_chain.eps_net).requires_grad_(True)
        kwargs = {**(self.hparams.sampler or {}), **sampler}
        schedule = subsample(self.betas, steps, subsample_kind, kwargs.pop("spacing", "linear"))
        return GaussianChain(net, schedule, self.event_shape, **kwargs)

    def solver(self, steps: int, solver: str) -> SchedulerSampler:
        """A training-free ``steps``-step diffusers solver (``ddim``, ``dpmpp2m``) on the
        evaluated eps-network."""
        net = self.eval_chain.eps_net
        sampler = SchedulerSampler(net, self.betas, steps, solver, self.event_shape)
        return sampler.to(self.device).eval()  # its borrowed eps-net is not switched to train

    def rows(self) -> list[Row]:
        """Its own chain (id ``ddpm_T{T}``), then one variant per ``eval_steps`` entry: a
        sub-sampled chain (``ddpm_T{T}_to{S}_{subsample}``, any other chain key appended) or a
        solver (``{solver}_{S}``)."""
        T = self.chain.steps
        out = [Row(f"ddpm_T{T}", f"DDPM T={T}", self.eval_chain)]
        for spec in self.hparams.eval_steps or []:
            spec = dict(spec)
            steps = spec.pop("steps")
            if "solver" in spec:
                sampler = self.solver(steps, spec["solver"])
                out.append(Row(f"{spec['solver']}_{steps}", sampler.label, sampler, role="variant"))
                continue
            kind = spec.pop("subsample", "uniform")
            extra = "".join(f", {k}={v}" for k, v in spec.items())  # spacing, variance, ...
            row_id = f"ddpm_T{T}_to{steps}_{kind}" + "".join(f"_{k}={v}" for k, v in spec.items())
            chain = self.short_chain(steps, kind, **spec).to(self.device)
            out.append(Row(row_id, f"DDPM T={T}→{steps} ({kind}{extra})", chain, role="variant"))
        return out

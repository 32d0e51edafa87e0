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

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.methods.base import SamplerMethod


class DDPM(SamplerMethod):
    """Args (all config keys of ``conf/method/ddpm.yaml``):
    backbone: eps-network config (``_target_`` + kwargs; ``dim`` and ``n_steps`` are filled in).
    dim: data dimension. schedule: ``beta_schedule`` kwargs (name, steps, beta_start, beta_end).
    sampler: ``GaussianChain`` kwargs of the evaluation chain (parameterisation, variance, eta).
    optimizer: optimiser config (``_target_`` + kwargs). grad_clip: max grad norm (None = off).
    ema_decay: EMA of the eps-network (0 = off). eval_steps: extra sub-sampled chains to report,
    each ``{steps: T', subsample: kind}``. antithetic: pair t with T-1-t in the loss.
    log_every_n_steps: how often the loss is logged (logging every step costs ~10% on toy data).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        dim: int,
        schedule: dict[str, Any],
        optimizer: dict[str, Any],
        sampler: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.999,
        eval_steps: list[dict[str, Any]] | None = None,
        antithetic: bool = True,
        log_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        betas = beta_schedule(**schedule)
        self.register_buffer("betas", betas)  # float64: sub-sampling needs the exact schedule
        self.register_buffer("alpha_bar_full", alpha_bar(betas).float())
        eps_net = instantiate(backbone, dim=dim, n_steps=len(betas))
        self.chain = GaussianChain(eps_net, subsample(betas, len(betas)), (dim,), **(sampler or {}))
        self.init_ema(ema_decay)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = denoising_loss(
            self.chain.eps_net, batch, self.alpha_bar_full, antithetic=self.hparams.antithetic
        )
        if batch_idx % self.hparams.log_every_n_steps == 0:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        self.update_ema()

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, self.hparams.grad_clip, "norm")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return instantiate(self.hparams.optimizer, params=self.chain.parameters())

    def short_chain(
        self, steps: int, subsample_kind: str = "none", **sampler: Any
    ) -> GaussianChain:
        """A T'-step chain on (a copy of) the evaluated eps-network; ``sampler`` overrides the
        chain kwargs this model was trained with."""
        net = copy.deepcopy(self.eval_chain.eps_net).requires_grad_(True)
        kwargs = {**(self.hparams.sampler or {}), **sampler}
        schedule = subsample(self.betas, steps, subsample_kind, kwargs.pop("spacing", "linear"))
        return GaussianChain(net, schedule, (self.hparams.dim,), **kwargs)

    def samplers(self) -> dict[str, GaussianChain]:
        out = {f"DDPM T={self.chain.steps}": self.eval_chain}
        for spec in self.hparams.eval_steps or []:
            spec = dict(spec)
            steps, kind = spec.pop("steps"), spec.pop("subsample", "uniform")
            out[f"DDPM T={self.chain.steps}→{steps} ({kind})"] = self.short_chain(
                steps, kind, **spec
            ).to(self.device)
        return out

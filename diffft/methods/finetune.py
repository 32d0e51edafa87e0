"""What every fine-tuning method (SFT-PG, DxMI, the contrastive chain) shares: the T'-step chain
built from a pretrained DDPM, its frozen init copy, one helper for a manual optimiser step, and
learning-rate schedules over the run's batches."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from diffft.diffusion.chain import GaussianChain
from diffft.methods.base import (
    SamplerMethod,
    check_lr_schedule,
    cosine_decay,
    known_hparams,
    load_method,
)
from diffft.methods.ddpm import DDPM
from diffft.methods.diagnostics import grad_norm


class FineTuneMethod(SamplerMethod):
    """What every fine-tuning method (SFT-PG, DxMI, ...) shares on top of ``SamplerMethod``.

    * ``build_chain``: the T'-step ``GaussianChain`` built from a pretrained DDPM, either from
      ``init_from`` (a DDPM checkpoint: its hyper-parameters are kept in ``hparams.ddpm``) or,
      when the method is rebuilt from its own checkpoint, from ``hparams.ddpm`` alone (the
      weights then come from this method's state dict); plus ``init_chain``, a frozen copy of
      the chain before fine-tuning (the "DDPM T' (init)" row of the tables).
    * one counter, ``batches_done`` (``SamplerMethod``: in every checkpoint, and the seed of each
      batch's random stream ``batch_generator()``), counts the method's iterations (one per
      Lightning batch); Lightning's ``global_step`` counts optimiser steps of every part.
    * ``manual_step``: one optimiser step under manual optimisation, the only way the
      manual-optimisation methods step (``chunks``: index slices that bound its memory).
    * ``lr_schedule_config`` / ``step_lr_schedulers``: ``method.lr_schedule`` as Lightning
      schedulers (``LambdaLR``) over the run's batches, their state in the checkpoint.
    """

    # (clip, optimiser whose gradient norm is logged) of the ``manual_step`` in progress: read
    # by ``on_before_optimizer_step``, where Lightning has unscaled the gradients.
    _stepping: tuple[float | None, Any] | None = None

    init_data: dict[str, Any] | None = None  # the DDPM's training data (from init_from)

    @classmethod
    def stages(cls, cfg: dict[str, Any]) -> dict[str, str]:
        """An empty ``init_from`` is filled by the ``pretrain`` stage (a DDPM of its recipe)."""
        return {} if cfg.get("init_from") else {"init_from": "pretrain"}

    def build_chain(
        self,
        event_shape: list[int],
        init_from: str | None,
        ddpm_hparams: dict[str, Any] | None,
        sampler: dict[str, Any],
        **forced: Any,
    ) -> GaussianChain:
        """Set ``self.chain`` (trainable) and ``self.init_chain`` (frozen copy); ``forced``
        chain kwargs override ``sampler`` (e.g. DxMI's ``learn_sigma=True``)."""
        sampler = {**sampler, **forced}
        if ddpm_hparams is None:
            if not init_from:
                raise ValueError("method.init_from is empty: set it to a DDPM checkpoint")
            ddpm = load_method(init_from, "method.init_from")
            if not isinstance(ddpm, DDPM):
                raise ValueError(
                    f"method.init_from='{init_from}' is a {type(ddpm).__name__}, not a DDPM"
                )
            if list(ddpm.event_shape) != [int(d) for d in event_shape]:
                raise ValueError(
                    f"method.init_from='{init_from}' is a DDPM of samples of shape "
                    f"{list(ddpm.event_shape)}, but this run's data have shape "
                    f"{list(event_shape)} (dataset.event_shape)"
                )
            self.hparams["ddpm"] = dict(ddpm.hparams)
            self.init_data = ddpm.data_identity
        else:  # rebuilt from this method's own checkpoint: weights come from its state_dict
            ddpm = self.ddpm_from_hparams(ddpm_hparams)
        steps, kind = sampler.pop("steps"), sampler.pop("subsample", "none")
        self.chain = ddpm.short_chain(steps, kind, **sampler)
        # What chain_like needs: the DDPM's float64 betas (from its hyper-parameters) and
        # the chain's kwargs.
        self.ddpm_betas = ddpm.betas.detach().clone()
        self._chain_spec = (kind, {**(ddpm.hparams.get("sampler") or {}), **sampler})
        self.init_chain = copy.deepcopy(self.chain).requires_grad_(False)
        return self.chain

    def log_grad_norm(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``diag/sampler_grad_norm`` of ``optimizer``'s parameters on logging batches
        (``manual_step(..., log_grad_norm=True)`` calls it from ``on_before_optimizer_step``,
        where Lightning has unscaled (16-mixed) just these gradients and clipping has not yet
        run)."""
        if self.logging_batch():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.log("diag/sampler_grad_norm", grad_norm(params))

    def chain_like(self, steps: int) -> GaussianChain:
        """A ``steps``-step chain on the same eps-network as ``self.chain`` (shared parameters)
        and with the same kwargs and sub-sampling kind, e.g. a longer training chain."""
        from diffft.diffusion.schedules import subsample

        kind, kwargs = self._chain_spec
        kwargs = dict(kwargs)
        schedule = subsample(self.ddpm_betas, steps, kind, kwargs.pop("spacing", "linear"))
        chain = GaussianChain(self.chain.eps_net, schedule, self.chain.event_shape, **kwargs)
        return chain.to(self.chain.device)

    @staticmethod
    def ddpm_from_hparams(hparams: dict[str, Any]) -> Any:
        """A ``DDPM`` with fresh weights from saved hyper-parameters (keys that are no longer
        arguments, from older versions, are dropped)."""
        return DDPM(**known_hparams(DDPM, hparams))

    @staticmethod
    def chunks(n: int, size: int | None) -> list[slice]:
        """Consecutive slices of at most ``size`` of ``range(n)`` (None or 0: one slice)."""
        size = size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # -- one optimiser step ---------------------------------------------------------------------
    def manual_step(
        self,
        opts: Sequence[Any],
        loss: torch.Tensor | Callable[[slice], torch.Tensor],
        *,
        n: int = 1,
        chunk: int | None = None,
        part: str | None = None,
        clip: float | None = None,
        log_grad_norm: bool = False,
    ) -> torch.Tensor:
        """One optimiser step of ``opts`` (several when one loss trains several parts, e.g. DxMI's
        sampler mean and sigma) under manual optimisation; returns the (detached) loss.

        toggle ``opts`` -> zero their gradients -> ``manual_backward`` -> (check) -> step each
        -> untoggle:

        * **toggle**: while the loss is built and back-propagated, only the parameters of
          ``opts`` require gradients (``toggled``), so a loss that reads another part (the
          sampler's loss reads the value) neither computes nor leaves gradients there.
        * ``loss``: a scalar, or ``loss_of(s)``, the mean over the items of slice ``s`` of a loss
          that is a mean over ``n`` items (transitions), back-propagated ``chunk`` items at a
          time (None: all at once); each chunk's backward is weighted by its share of ``n``, so
          the accumulated gradient is the full loss's, and peak memory is about one chunk's
          graph. Under DDP the backward passes of all chunks but the last run without the
          gradient all-reduce (``no_sync``); the last one all-reduces the accumulated sum, so
          every rank steps with the same averaged gradient (a per-chunk step, or a sync that
          skipped the accumulated chunks, would let the ranks drift apart).
        * ``part``: the mean loss is checked for non-finite values before the step, under that
          name (None: the caller has checked it).
        * ``clip``: the gradient norm of *each* optimiser's parameters is clipped to it;
          ``log_grad_norm``: ``diag/sampler_grad_norm`` of the first optimiser's parameters, taken
          before clipping. Both run in ``on_before_optimizer_step``, which Lightning calls inside
          each ``step`` after unscaling that optimiser's gradients (16-mixed), so they see true
          gradients under every precision.
        """
        if callable(loss):
            loss_of, blocks = loss, self.chunks(n, chunk)

            def chunk_loss(b: slice) -> torch.Tensor:
                return loss_of(b) * ((b.stop - b.start) / n)
        else:
            blocks = [slice(0, 1)]

            def chunk_loss(b: slice) -> torch.Tensor:
                return loss

        strategy = self._trainer.strategy if self._trainer is not None else None
        no_sync = getattr(strategy, "block_backward_sync", None)
        total = torch.zeros(())
        with self.toggled(opts):
            for opt in opts:
                opt.zero_grad()
            for i, b in enumerate(blocks):
                last = i == len(blocks) - 1
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    weighted = chunk_loss(b)
                    self.manual_backward(weighted)
                total = total.to(weighted.device) + weighted.detach()
            if part is not None:
                self.check_finite(**{part: total})
            first = getattr(opts[0], "optimizer", opts[0]) if log_grad_norm else None
            self._stepping = (clip, first)
            try:
                for opt in opts:
                    opt.step()
            finally:
                self._stepping = None
        return total

    def accumulate(
        self,
        opts: Sequence[Any],
        n: int,
        loss_of: Callable[[slice], torch.Tensor],
        chunk: int | None,
        part: str,
    ) -> torch.Tensor:
        """``manual_step(opts, loss_of, n=n, chunk=chunk, part=part)`` in its older positional
        form (kept for callers of that spelling, e.g. tests/test_accumulate.py)."""
        return self.manual_step(opts, loss_of, n=n, chunk=chunk, part=part)

    @contextlib.contextmanager
    def toggled(self, opts: Sequence[Any]) -> Iterator[None]:
        """Within: only the parameters of ``opts`` among those of the run's optimisers require
        gradients (Lightning's ``toggle_optimizer`` for several optimisers at once); their
        ``requires_grad`` flags are restored after. Outside a Trainer: nothing to toggle."""
        if self._trainer is None:
            yield
            return
        saved: dict[int, tuple[torch.Tensor, bool]] = {}
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    saved.setdefault(id(p), (p, p.requires_grad))
        own = {id(p) for opt in opts for group in opt.param_groups for p in group["params"]}
        for key, (p, requires_grad) in saved.items():
            p.requires_grad_(requires_grad and key in own)
        try:
            yield
        finally:
            for p, requires_grad in saved.values():
                p.requires_grad_(requires_grad)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._stepping is None:  # (not a manual_step: automatic optimisation clips itself)
            return
        clip, norm_of = self._stepping
        if optimizer is norm_of:
            self.log_grad_norm(optimizer)
        if clip:
            self.clip_gradients(optimizer, clip, "norm")

    # -- learning-rate schedules ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Automatic optimisation's default: ``optimizer`` (default Adam, lr 1e-4) on the
        eps-network, with ``lr_schedule`` (Lightning steps its scheduler). Manual methods
        (SFT-PG, DxMI) configure one optimiser per part instead."""
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-4}
        opt = instantiate(opt, params=self.chain.eps_net.parameters())
        return self.lr_schedule_config([opt], self.hparams.lr_schedule)

    def lr_schedule_config(self, optimizers: list[torch.optim.Optimizer], schedule: str) -> Any:
        """``configure_optimizers``' return value for ``optimizers`` under ``method.lr_schedule``:
        the optimisers alone (``constant``), or with one ``LambdaLR`` each (``cosine``: every
        base rate decays to 0 over the run's batches, ``total_batches``). Scheduler step ``i``
        sets the rate of batch ``i + 1``: a manual-optimisation method calls
        ``step_lr_schedulers`` at the end of each batch, Lightning steps them after each
        (single) optimiser step under automatic optimisation. Their state is in the
        checkpoint."""
        check_lr_schedule(schedule)
        if schedule == "constant":
            return optimizers
        factor = cosine_decay(self.total_batches())
        scheds = [LambdaLR(opt, factor) for opt in optimizers]
        return optimizers, [{"scheduler": s, "interval": "step"} for s in scheds]

    def schedulers(self) -> list[LRScheduler]:
        """This run's learning-rate schedulers (none under ``lr_schedule: constant``)."""
        scheds = self.lr_schedulers()
        if scheds is None:
            return []
        return list(scheds) if isinstance(scheds, list) else [scheds]

    def step_lr_schedulers(self) -> None:
        """One step of every scheduler: call at the end of each batch (manual optimisation)."""
        with warnings.catch_warnings():
            # SFT-PG's generator steps once in n_critic batches, but its rate follows the batches
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for sched in self.schedulers():
                sched.step()

    def on_train_start(self) -> None:
        # A checkpoint from before the schedulers (DxMI set its cosine rates by hand) restores
        # none: bring them to the batches already done, as an uninterrupted run has them.
        if self.batches_done > 0:
            for sched in self.schedulers():
                if sched.last_epoch == 0:
                    sched.last_epoch = self.batches_done - 1
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", "Detected call of", UserWarning)
                        sched.step()

    def total_batches(self) -> int:
        """The run's iterations (Lightning batches): ``max_epochs`` x batches per epoch, or fewer
        when ``trainer.max_steps`` (optimiser steps, ``batches_for_steps``) stops it first."""
        trainer = self.trainer
        totals = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            trainer.estimated_stepping_batches  # noqa: B018 (sets up the training data)
            totals.append(trainer.max_epochs * trainer.num_training_batches)
        if trainer.max_steps != -1:
            totals.append(self.batches_for_steps(trainer.max_steps))
        total = min(totals, default=0)
        if not 0 < total < 10**9:
            raise ValueError(
                "method.lr_schedule=cosine decays over the run's iterations: set "
                "trainer.max_epochs (or trainer.max_steps), or method.lr_schedule=constant"
            )
        return int(total)

    def batches_for_steps(self, steps: int) -> int:
        """The batches after which Lightning's ``global_step`` reaches ``steps``: one optimiser
        step per batch unless a method says otherwise."""
        return steps

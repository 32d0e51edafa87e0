"""Common base of every method: the chain, its EMA copy, the samplers to evaluate, and what makes
a run reproducible and DDP-correct (its own batch counter, one random stream per batch and rank,
a guard against non-finite losses)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.sampler import Sampler


class SamplerMethod(L.LightningModule):
    """A LightningModule that owns a ``GaussianChain`` (``self.chain``) and its EMA.

    Subclasses build ``self.chain`` and then call ``self.init_ema(decay)``. ``samplers()`` names
    the chains the evaluation reports (the EMA chain when EMA is on). Everything registered as a
    submodule or buffer (nets, EMA, learnable sigma) is in the checkpoint.

    Randomness and DDP: every random draw of a training batch (noise, times, rollouts, buffer
    minibatches) comes from ``batch_generator()``, seeded by ``(seed, global rank, batches
    done)``. So ranks draw different noise and rollouts while their parameters stay identical
    (DDP averages the gradients), a run resumed from a checkpoint draws exactly what the
    uninterrupted run drew (no generator state to save), and the data order follows
    ``batches_done`` too (``ToyDataModule``). Parameters start identical on every rank (the
    same ``seed_everything`` seed, and DDP broadcasts them once); EMA weights then stay
    identical because each rank applies the same update to the same parameters.
    """

    chain: GaussianChain
    # ``ToyDataModule.identity()`` of the training data (set by diffft.train, in checkpoints).
    data_identity: dict[str, Any] | None = None
    # The run's seed (diffft.train sets ``cfg.seed``) and the training batches done so far; both
    # are in the checkpoint. ``batches_done`` counts the current batch from its start.
    seed: int = 0
    batches_done: int = 0
    _generator: torch.Generator | None = None
    # False for a method without a sampler (an encoder): no periodic evaluation, no table.
    samples: bool = True

    def init_ema(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"method.ema_decay must be in [0, 1), got {decay}")
        self.ema_decay = decay
        self.ema_chain = copy.deepcopy(self.chain).requires_grad_(False) if decay > 0 else None

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_chain is None:
            return
        params = [p for p in self.chain.parameters()]
        ema = [p for p in self.ema_chain.parameters()]
        torch._foreach_lerp_(ema, params, 1.0 - self.ema_decay)

    @property
    def eval_chain(self) -> GaussianChain:
        """The chain used for sampling and evaluation (EMA when enabled)."""
        return self.ema_chain if self.ema_chain is not None else self.chain

    def samplers(self) -> dict[str, Sampler]:
        """Named samplers to evaluate at the end of a run; the first is the main one."""
        raise NotImplementedError

    def energies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``{sampler name: energy}`` for the rows that have an energy (points -> ``[n]``, low
        on data), scored by the energy metrics such as ``auc``; none by default."""
        return {}

    def extra_plots(self, out: Path, data: torch.Tensor, samples: torch.Tensor) -> list[Path]:
        """Method-specific figures written beside ``samples.png`` (``samples``: the main row's);
        returns their paths (also sent to W&B)."""
        return []

    # -- the training loop's bookkeeping --------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Subclasses that override this hook call super() first.
        self.batches_done += 1

    def batch_generator(self) -> torch.Generator:
        """The random stream of this training batch on this rank (call once per batch, at its
        start, and draw everything from it)."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(self.device)
        self._generator.manual_seed(batch_seed(self.seed, self.global_rank, self.batches_done))
        return self._generator

    def logging_batch(self) -> bool:
        """Whether Lightning writes this batch's ``self.log`` values to the loggers.

        It writes on the batches where ``batches done % trainer.log_every_n_steps == 0``
        (whatever the epoch length); logging on the other batches only costs time (~10% of a toy
        DDPM step), so methods log when this is true.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and self.batches_done % every == 0

    def check_finite(self, **losses: torch.Tensor) -> None:
        """Stop the run at the first non-finite loss, naming the step and the part (``critic``,
        ``sampler``, ...). Under DDP the decision is all-reduced, so every rank stops at the same
        step (one rank alone raising would leave the others waiting in a collective)."""
        bad = [part for part, v in losses.items() if not bool(torch.isfinite(v).all())]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            if trainer.strategy.reduce_boolean_decision(not bad, all=True):
                return
            bad = bad or ["another rank's"]
        elif not bad:
            return
        values = ", ".join(f"{k}={float(v.detach().float().mean()):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"step {self.batches_done}: non-finite {' and '.join(bad)} loss ({values}); "
            "the run stops here and its last good checkpoint (checkpoints/last.ckpt, if one was "
            "saved) is unchanged: resume from it with ckpt_path=... (e.g. with a lower learning "
            "rate or grad_clip)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets ``load_method`` rebuild the right class from a checkpoint alone.
        checkpoint["diffft_method"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["diffft_data"] = self.data_identity
        checkpoint["diffft_seed"] = self.seed
        checkpoint["diffft_batches_done"] = self.batches_done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_identity = checkpoint.get("diffft_data", self.data_identity)
        self.seed = checkpoint.get("diffft_seed", self.seed)
        self.batches_done = checkpoint.get("diffft_batches_done", self.batches_done)


class FineTuneMethod(SamplerMethod):
    """What every fine-tuning method (SFT-PG, DxMI, ...) shares on top of ``SamplerMethod``.

    * ``build_chain``: the T'-step ``GaussianChain`` built from a pretrained DDPM, either from
      ``init_from`` (a DDPM checkpoint: its hyper-parameters are kept in ``hparams.ddpm``) or,
      when the method is rebuilt from its own checkpoint, from ``hparams.ddpm`` alone (the
      weights then come from this method's state dict); plus ``init_chain``, a frozen copy of
      the chain before fine-tuning (the "DDPM T' (init)" row of the tables).
    * ``iteration``: the method's own count of its iterations (a buffer, in the checkpoint), not
      Lightning's ``global_step`` (which counts optimiser steps of every part).
    * the per-rank random stream of each batch is ``batch_generator()`` (see ``SamplerMethod``).
    * ``chunks``: index slices that bound the memory of updates over many transitions.
    """

    init_data: dict[str, Any] | None = None  # the DDPM's training data (from init_from)

    def build_chain(
        self,
        event_shape: list[int],
        init_from: str | None,
        ddpm_hparams: dict[str, Any] | None,
        sampler: dict[str, Any],
        **forced: Any,
    ) -> GaussianChain:
        """Set ``self.chain`` (trainable), ``self.init_chain`` (frozen copy) and the
        ``iteration`` counter; ``forced`` chain kwargs override ``sampler`` (e.g. DxMI's
        ``learn_sigma=True``)."""
        from diffft.methods.ddpm import DDPM  # (ddpm.py imports this module)

        sampler = {**sampler, **forced}
        if ddpm_hparams is None:
            if not init_from:
                raise ValueError("method.init_from is empty: set it to a DDPM checkpoint")
            ddpm = load_method(init_from)
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
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        return self.chain

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
        from diffft.methods.ddpm import DDPM

        return DDPM(**known_hparams(DDPM, hparams))

    @staticmethod
    def chunks(n: int, size: int | None) -> list[slice]:
        """Consecutive slices of at most ``size`` of ``range(n)`` (None or 0: one slice)."""
        size = size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def accumulate(
        self,
        opts: list[Any],
        n: int,
        loss_of: Callable[[slice], torch.Tensor],
        chunk: int | None,
        part: str,
    ) -> torch.Tensor:
        """One optimiser step of ``opts`` on a loss that is a mean over ``n`` items (transitions),
        back-propagated chunk by chunk: ``loss_of(s)`` is the mean over the items of slice
        ``s``; each chunk's backward is weighted by its share of ``n``, so the accumulated
        gradient is the full loss's, and peak memory is about one chunk's graph (``chunk``
        items; None: all at once).

        Under DDP the backward passes of all chunks but the last run without the gradient
        all-reduce (``no_sync``); the last one all-reduces the accumulated sum, so every rank
        steps with the same averaged gradient (a per-chunk step, or a sync that skipped the
        accumulated chunks, would let the ranks drift apart). The mean loss is checked for
        non-finite values (``part`` names it) before the step."""
        for opt in opts:
            opt.zero_grad()
        blocks = self.chunks(n, chunk)
        strategy = self._trainer.strategy if self._trainer is not None else None
        no_sync = getattr(strategy, "block_backward_sync", None)
        total = torch.zeros(())
        for i, b in enumerate(blocks):
            last = i == len(blocks) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = loss_of(b) * ((b.stop - b.start) / n)
                self.manual_backward(loss)
            total = total.to(loss.device) + loss.detach()
        self.check_finite(**{part: total})
        for opt in opts:
            opt.step()
        return total


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the part."""


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """A 63-bit seed for ``(run seed, rank, batch)``: distinct streams for every rank and batch
    (the triple is combined with odd 64-bit constants and mixed by SplitMix64's finaliser;
    ~1 us, where numpy's ``SeedSequence`` takes 20 us of a 2 ms toy step)."""
    m = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xD1B54A32D192ED03 + batch * 0xABC98388FB8FAC03) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) >> 1


def known_hparams(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """Saved hyper-parameters that are still arguments of ``cls``; a checkpoint from before
    ``event_shape`` (an int ``dim``, also inside ``hparams.ddpm``) is translated."""
    hparams = dict(hparams)
    if "dim" in hparams and "event_shape" not in hparams:
        hparams["event_shape"] = [int(hparams.pop("dim"))]
    if isinstance(hparams.get("ddpm"), dict):
        hparams["ddpm"] = known_hparams(dict, hparams["ddpm"])  # dict: keep every key
    if cls is dict:
        return hparams
    known = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hparams.items() if k in known}


def load_method(path: str) -> SamplerMethod:
    """The method saved in a checkpoint written by ``python -m diffft.train``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "diffft_method" not in ckpt:
        raise ValueError(f"ckpt: '{path}' was not written by diffft.train (no 'diffft_method')")
    module, _, name = ckpt["diffft_method"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    # What LightningModule.load_from_checkpoint does, without reading the file a second time;
    # like it, hyper-parameters that are no longer arguments (older versions) are dropped.
    method = cls(**known_hparams(cls, ckpt["hyper_parameters"]))
    method.on_load_checkpoint(ckpt)
    method.load_state_dict(ckpt["state_dict"])
    return method

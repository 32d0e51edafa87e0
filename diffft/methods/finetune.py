"""What every fine-tuning method (SFT-PG, DxMI, the contrastive chain) shares: the T'-step chain
built from a pretrained DDPM, its frozen init copy, and chunked optimiser steps."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch

from diffft.diffusion.chain import GaussianChain
from diffft.methods.base import SamplerMethod, known_hparams, load_method
from diffft.methods.ddpm import DDPM
from diffft.methods.diagnostics import grad_norm


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
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        return self.chain

    def log_grad_norm(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``diag/sampler_grad_norm`` of ``optimizer``'s parameters on logging batches; call
        from ``on_before_optimizer_step``, where Lightning has unscaled (16-mixed) just these
        gradients and clipping has not yet run."""
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

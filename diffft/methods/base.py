"""Common base of every method: the chain, its EMA copy, and the samplers to evaluate."""

from __future__ import annotations

import copy
import importlib
import inspect
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
    """

    chain: GaussianChain
    # ``ToyDataModule.identity()`` of the training data (set by diffft.train, in checkpoints).
    data_identity: dict[str, Any] | None = None

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

    def logging_batch(self) -> bool:
        """Whether Lightning writes this batch's ``self.log`` values to the loggers.

        It writes on the batches where ``(batches done + 1) % trainer.log_every_n_steps == 0``
        (whatever the epoch length); logging on the other batches only costs time (~10% of a toy
        DDPM step), so methods log when this is true.
        """
        every = self.trainer.log_every_n_steps
        done = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        return every > 0 and (done + 1) % every == 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets ``load_method`` rebuild the right class from a checkpoint alone.
        checkpoint["diffft_method"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["diffft_data"] = self.data_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_identity = checkpoint.get("diffft_data", self.data_identity)


def load_method(path: str) -> SamplerMethod:
    """The method saved in a checkpoint written by ``python -m diffft.train``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "diffft_method" not in ckpt:
        raise ValueError(f"ckpt: '{path}' was not written by diffft.train (no 'diffft_method')")
    module, _, name = ckpt["diffft_method"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    # What LightningModule.load_from_checkpoint does, without reading the file a second time;
    # like it, hyper-parameters that are no longer arguments (older versions) are dropped.
    known = inspect.signature(cls.__init__).parameters
    method = cls(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in known})
    method.on_load_checkpoint(ckpt)
    method.load_state_dict(ckpt["state_dict"])
    return method

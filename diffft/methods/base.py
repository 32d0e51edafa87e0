"""Common base of every method: the chain, its EMA copy, the samplers to evaluate, and what makes
a run reproducible and DDP-correct (its own batch counter, one random stream per batch and rank,
a guard against non-finite losses)."""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffft.diffusion.chain import GaussianChain
from diffft.rows import Row, main_row
from diffft.seeding import batch_seed


class SamplerMethod(L.LightningModule):
    """A LightningModule that owns a ``GaussianChain`` (``self.chain``) and its EMA.

    Subclasses build ``self.chain`` and then call ``self.init_ema(decay)``. ``rows()`` names
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

    @classmethod
    def stages(cls, cfg: dict[str, Any]) -> dict[str, str]:
        """The cached stages the method configured by ``cfg`` (its ``method`` node) needs, as
        ``{constructor argument: top-level config node}``: the stage layer trains (or reuses)
        the run that node's ``overrides`` describe and passes its ``last.ckpt`` as that argument
        (``diffft.report.stages.provide``). None by default."""
        return {}

    @classmethod
    def ddpm_steps(cls, cfg: dict[str, Any]) -> int | None:
        """T of the DDPM this configuration trains (the training-free solvers run on it), or
        None when the method is not a DDPM."""
        return None

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

    def rows(self) -> list[Row]:
        """The rows this method offers the table (``diffft.rows.Row``): exactly one with role
        ``main`` (the run's model, also what the periodic evaluation and ``diffft.sample`` /
        ``diffft.score`` use), then its init, variants ...; none for a method that does not
        sample (an encoder)."""
        raise NotImplementedError

    def main_row(self) -> Row:
        return main_row(self.rows())

    def extra_plots(self, out: Path, data: torch.Tensor, samples: torch.Tensor) -> list[Path]:
        """Method-specific figures written beside ``samples.png`` (``samples``: the main row's);
        returns their paths (also sent to W&B)."""
        return []

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        """Automatic optimisation: the norm of the gradient clipped at ``grad_clip`` (None/0:
        off); manual-optimisation methods clip in their own step."""
        if self.hparams.get("grad_clip"):
            self.clip_gradients(optimizer, self.hparams.grad_clip, "norm")

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
        if self._trainer is None:  # (a module driven by hand, outside a Trainer)
            return False
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
        # Called before the state dict is loaded, by a Lightning resume and by ``load_method``.
        self.data_identity = checkpoint.get("diffft_data", self.data_identity)
        self.seed = checkpoint.get("diffft_seed", self.seed)
        self.batches_done = checkpoint.get("diffft_batches_done", self.batches_done)
        # Fine-tuning methods counted their iterations a second time, in an ``iteration``
        # buffer (always equal to ``batches_done``); checkpoints from then still load.
        checkpoint.get("state_dict", {}).pop("iteration", None)

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Saved hyper-parameters of an older version in this version's form (``load_method``
        rebuilds the method from them); nothing to translate by default."""
        return hparams


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the part."""


# Learning-rate schedules of every method (``method.lr_schedule``).
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(name: str) -> None:
    if name not in LR_SCHEDULES:
        raise ValueError(f"method.lr_schedule={name!r}; expected one of {LR_SCHEDULES}")


def cosine_decay(total: int) -> Callable[[int], float]:
    """The factor of the base learning rate after ``i`` scheduler steps, ``0.5 (1 + cos(pi
    min(i, total) / total))``: 1 at the start, 0 after ``total`` steps (and after). The closed
    form, for ``torch.optim.lr_scheduler.LambdaLR``: each step's rate is ``base * factor``
    exactly, with nothing accumulated from the previous steps."""

    def factor(i: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(i, total) / total))

    return factor


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


def read_checkpoint(path: str | Path, key_name: str = "ckpt") -> dict[str, Any]:
    """A checkpoint written by ``python -m diffft.train``, read onto the CPU. A damaged file (a copy
    cut short), any other file, or a torch file of something else is one error naming
    ``key_name`` and the file, instead of torch's ``OSError`` / ``UnpicklingError`` traceback."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key_name}='{path}': no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # what a broken pickle or zip raises varies: EOF, OS, Runtime...
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{key_name}='{path}' is not a readable checkpoint (truncated or not a torch file): "
            f"{type(err).__name__}: {reason}"
        ) from None
    if not isinstance(ckpt, dict) or "diffft_method" not in ckpt:
        raise ValueError(
            f"{key_name}='{path}' was not written by diffft.train (no 'diffft_method')"
        )
    return ckpt


def load_method(path: str, key_name: str = "ckpt") -> SamplerMethod:
    """The method saved in a checkpoint written by ``python -m diffft.train``; errors name the
    file as ``key_name`` (the config key or argument it came from)."""
    ckpt = read_checkpoint(path, key_name)
    module, _, name = ckpt["diffft_method"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    # What LightningModule.load_from_checkpoint does, without reading the file a second time;
    # like it, hyper-parameters that are no longer arguments (older versions) are dropped.
    method = cls(**known_hparams(cls, cls.upgrade_hparams(dict(ckpt["hyper_parameters"]))))
    method.on_load_checkpoint(ckpt)
    method.load_state_dict(ckpt["state_dict"])
    return method

"""``last.ckpt`` at the end of training, and a Ctrl-C that stops at the end of a batch."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn


class Interrupted(Exception):
    """Ctrl-C stopped the training at the end of a batch (``last.ckpt`` was written there)."""


class LastCheckpoint(Checkpoint):
    """Writes ``dirpath/last.ckpt`` when training ends (inside the training processes, so a
    ``ddp_spawn`` run saves its ranks' own state), and makes Ctrl-C resumable exactly.

    Ctrl-C (SIGINT) during a single-process run only sets a flag: the current batch finishes
    (a half-done step, e.g. a critic updated but not its sampler, cannot be resumed exactly),
    then ``last.ckpt`` is written at the end of that batch and ``Interrupted`` is raised (not
    ``trainer.should_stop``: Lightning would then close the epoch and other checkpoint
    callbacks would write that state over ``last.ckpt`` in ``on_train_end``). A second Ctrl-C
    interrupts at once (Lightning's shutdown; no checkpoint). Under DDP the ranks would see the
    signal at different batches, so Ctrl-C keeps Lightning's behaviour there and the last
    periodic checkpoint is the one to resume.

    ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only at its own intervals; as a
    ``Checkpoint`` this callback runs after it (Lightning orders checkpoint callbacks last), so
    the file is the end of training. Exceptions (a non-finite loss) save nothing: the last good
    checkpoint stays.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self._requested = False
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._requested:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self._requested = True
        print("\nCtrl-C: stopping after this batch (again to stop at once)", flush=True)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self._requested:
            trainer.save_checkpoint(self.path)
            raise Interrupted(
                f"interrupted after batch {pl_module.batches_done}: saved {self.path}; resume "
                f"with ckpt_path={self.path}"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore()
        trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt):
            rank_zero_warn(
                f"interrupted in the middle of a step: {self.path} is the last periodic "
                "checkpoint (a single Ctrl-C stops at the end of a batch and saves it)"
            )

"""Progress for logs that are not a terminal: one short line per epoch (or per ``every``
batches when epochs are long), instead of a tqdm bar redrawn into the file every few batches."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger("diffft")


class LineProgress(L.Callback):
    """Logs ``batch B/N (epoch E) Xs values`` at the end of an epoch (at most one line per
    ``min_s`` seconds: toy epochs last a second), every ``every`` batches within longer epochs
    and at the end; the values are the progress-bar ones (losses, the last periodic eval)."""

    def __init__(self, every: int = 1000, min_s: float = 15.0) -> None:
        self.every, self.min_s = every, min_s
        self._start = self._last = 0.0
        self._logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        done = getattr(pl_module, "batches_done", trainer.global_step)
        if done % self.every == 0:
            self._line(trainer, done)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        done = getattr(pl_module, "batches_done", trainer.global_step)
        if done != self._logged and time.perf_counter() - self._last >= self.min_s:
            self._line(trainer, done)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        done = getattr(pl_module, "batches_done", trainer.global_step)
        if done != self._logged:
            self._line(trainer, done)

    def _line(self, trainer: L.Trainer, done: int) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None and trainer.max_epochs and trainer.num_training_batches != float("inf"):
            total = trainer.max_epochs * int(trainer.num_training_batches)
        values = {k: float(v) for k, v in trainer.progress_bar_metrics.items()}
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())[:8])
        of = f"/{total}" if total else ""
        self._last, self._logged = time.perf_counter(), done
        took = self._last - self._start
        per = trainer.num_training_batches  # the epoch of the last batch, from 1
        epoch = -(-done // int(per)) if 0 < per < float("inf") else trainer.current_epoch
        log.info("batch %d%s (epoch %d) %.0fs %s", done, of, epoch, took, shown)

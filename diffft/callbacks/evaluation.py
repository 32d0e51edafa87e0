"""Periodic evaluation during training: a small sampling of the main chain, logged as ``eval/*``.

The full evaluation (all samplers, all draws, the floor, the summary table) runs once at the end
of ``diffft.train``; this callback only tracks progress and feeds checkpoint selection.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from diffft.evaluation import Evaluator


class PeriodicEvaluation(L.Callback):
    """Every ``every_n_batches`` training batches: sample ``n`` points (one draw), log metrics."""

    def __init__(self, evaluator: Evaluator, every_n_batches: int, n: int = 2_000) -> None:
        self.every, self.batches = every_n_batches, 0
        self.elapsed, self._start = 0.0, 0.0  # training wall time (excluding evaluation)
        self.evaluator = Evaluator(
            evaluator.dm,
            evaluator.metrics,
            n=n,
            draws=1,
            seed=evaluator.seed,
            w2_points=min(n, evaluator.w2_points),
            batch_size=evaluator.batch_size,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.batches += 1
        if self.every > 0 and self.batches % self.every == 0:
            now = time.perf_counter()
            self.elapsed += now - self._start
            values = self.evaluator.evaluate(pl_module.eval_chain)
            logs = {f"eval/{k}": v[0] for k, v in values.items()}
            # For the progress bar and checkpoint monitoring only: Lightning would write these to
            # the loggers only on batches that are multiples of trainer.log_every_n_steps.
            pl_module.log_dict(logs, prog_bar=True, logger=False)
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            row = {**logs, "time/train_s": self.elapsed, "time/batches": float(self.batches)}
            # (When every_n_batches is a multiple of log_every_n_steps, metrics.csv has a loss row
            # and an eval row with the same step.)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(row, step=step)
            self._start = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.batches = int(state_dict["batches"])
        self.elapsed = state_dict.get("elapsed", 0.0)

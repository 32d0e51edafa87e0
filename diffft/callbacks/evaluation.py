"""Periodic evaluation during training: a small sampling of the main chain, logged as ``eval/*``.

The full evaluation (all samplers, all draws, the floor, the summary table) runs once at the end
of ``diffft.train``; this callback only tracks progress and feeds checkpoint selection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffft.evaluation import Evaluator
from diffft.media import log_image


class PeriodicEvaluation(L.Callback):
    """Every ``every_n_batches`` training batches: sample ``n`` points (one draw), log metrics;
    with ``plot_dir``, also plot the samples (``plot_dir/step_NNNNNNN.png``, logged as the image
    ``samples/periodic`` to W&B / TensorBoard)."""

    def __init__(
        self,
        evaluator: Evaluator,
        every_n_batches: int,
        n: int = 2_000,
        plot_dir: str | Path | None = None,
    ) -> None:
        self.every = every_n_batches
        self.plot_dir = Path(plot_dir) if plot_dir else None
        self.elapsed, self._start = 0.0, 0.0  # training wall time (excluding evaluation)
        self.evaluator = Evaluator(
            evaluator.dm,
            evaluator.metrics,
            n=n,
            draws=1,
            seed=evaluator.seed,
            w2_points=min(n, evaluator.w2_points),
            batch_size=evaluator.batch_size,
            auc_box=evaluator.box,
            cache_dir=evaluator.cache_dir,  # the image metrics' feature network is cached there
            features=evaluator.features,
            inception_weights=evaluator.inception_weights,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        done = pl_module.batches_done  # the method's own counter (restored on resume)
        if not getattr(pl_module, "samples", True):  # e.g. an encoder: nothing to evaluate
            return
        if self.every > 0 and done % self.every == 0:
            now = time.perf_counter()
            self.elapsed += now - self._start
            # Rank 0 samples and scores; the others wait in the broadcast and log the same
            # values (checkpoint monitoring runs on every rank).
            energy = pl_module.main_row().energy  # the run's own energy (or None)
            values = {}
            if trainer.is_global_zero:
                pl_module.eval()  # the energy / value nets too, not only the sampler
                try:
                    values = self.evaluator.evaluate(pl_module.eval_chain, energy=energy)
                finally:
                    pl_module.train()
            values = trainer.strategy.broadcast(values, src=0)
            logs = {f"eval/{k}": v[0] for k, v in values.items() if v}
            # For the progress bar and checkpoint monitoring only: Lightning would write these to
            # the loggers only on batches that are multiples of trainer.log_every_n_steps.
            pl_module.log_dict(logs, prog_bar=True, logger=False)
            row = {**logs, "time/train_s": self.elapsed, "time/batches": float(done)}
            # At Lightning's step for this batch (batches done before it), the step of its loss
            # row: when every_n_batches is a multiple of log_every_n_steps, metrics.csv has a
            # loss row and an eval row with the same step.
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(row, step=done - 1)
                if self.plot_dir is not None:
                    self.plot(trainer, pl_module)
            self._start = time.perf_counter()

    def plot(self, trainer: L.Trainer, pl_module: Any) -> None:
        step, chain = pl_module.batches_done, pl_module.eval_chain
        g = torch.Generator(chain.device).manual_seed(self.evaluator.seed)
        with torch.no_grad():
            x = chain.sample(self.evaluator.n, generator=g, batch_size=self.evaluator.batch_size)
        path = self.plot_dir / f"step_{step:07d}.png"
        self.evaluator.dm.plot({f"step {step}": x}, path)
        log_image(trainer.loggers, "samples/periodic", path, step=step)

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.elapsed = state_dict.get("elapsed", 0.0)

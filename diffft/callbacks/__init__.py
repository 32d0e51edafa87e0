"""The trainer's callbacks: periodic evaluation, checkpoints, progress and throughput."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from diffft.callbacks.checkpoint import LastCheckpoint
from diffft.callbacks.evaluation import PeriodicEvaluation
from diffft.callbacks.progress import LineProgress
from diffft.evaluation import METRICS


def build_callbacks(cfg: DictConfig, evaluator: Any) -> list[L.Callback]:
    """The periodic evaluation (``eval.every_n_batches``), the ``callbacks`` group (a
    ``ModelCheckpoint`` on ``eval.monitor`` keeps the best value: highest for an AUC),
    ``last.ckpt`` at the end of training (and of a Ctrl-C), and the progress: a bar on a
    terminal, a line per epoch in a log file."""
    out = Path(cfg.paths.output_dir)
    callbacks: list[L.Callback] = []
    if cfg.eval.every_n_batches > 0:
        plots = out / "plots" if cfg.eval.get("periodic_plots") else None
        n = cfg.eval.periodic_n
        callbacks.append(PeriodicEvaluation(evaluator, cfg.eval.every_n_batches, n, plot_dir=plots))
    for c in (cfg.get("callbacks") or {}).values():
        if not c:
            continue
        if c.get("monitor") and str(c.get("_target_", "")).endswith("ModelCheckpoint"):
            metric = METRICS.get(str(cfg.eval.get("monitor")))
            c = OmegaConf.merge(c, {"mode": metric.better if metric else c.get("mode", "min")})
        callbacks.append(instantiate(c))
    callbacks.append(LastCheckpoint(out / "checkpoints"))
    if progress_bar(cfg):
        # Redrawn every batch, tqdm costs ~0.4 ms of a 2 ms toy step.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    elif cfg.trainer.get("enable_progress_bar", True):  # a log file: a line per epoch
        callbacks.append(LineProgress())
    return callbacks


def progress_bar(cfg: DictConfig) -> bool:
    """A tqdm bar only on a terminal (``trainer.enable_progress_bar`` and stderr a TTY)."""
    return bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stderr.isatty()

"""What goes to the experiment trackers besides scalar curves: the resolved run config and images
(``samples.png``, the periodic sample plots; later image grids).

Each function takes the trainer's loggers and does what each kind supports: W&B gets the config
as its run config and images as ``wandb.Image`` media; TensorBoard gets images; the CSV logger
nothing (the files are in the run directory). Rank zero only.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def wants_media(loggers: Iterable[Logger]) -> bool:
    """Whether any logger shows images (so plots are worth drawing for it)."""
    return any(isinstance(lg, WandbLogger | TensorBoardLogger) for lg in loggers)


@rank_zero_only
def log_config(loggers: Iterable[Logger], config: dict[str, Any], path: str | Path) -> None:
    """The resolved run config as the W&B run config, and its file ``path`` (``config.yaml``)
    among the run's files as ``diffft_config.yaml`` (W&B's own ``config.yaml`` holds the keys
    flattened with its ``value`` wrappers; offline, it is only in the ``.wandb`` log)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.config.update(config, allow_val_change=True)
            shutil.copyfile(path, Path(lg.experiment.dir) / "diffft_config.yaml")


@rank_zero_only
def log_image(
    loggers: Iterable[Logger], key: str, path: str | Path, step: int | None = None
) -> None:
    """The PNG at ``path`` under ``key`` (e.g. ``samples/final``) at training step ``step``."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(lg, TensorBoardLogger):
            from PIL import Image

            image = np.asarray(Image.open(path).convert("RGB"))
            lg.experiment.add_image(key, image, global_step=step or 0, dataformats="HWC")


@rank_zero_only
def finish(loggers: Iterable[Logger], exit_code: int = 0) -> None:
    """End the W&B run (also after a failure, ``exit_code`` 1), so its files are complete and
    the next run of a sweep in this process (the basic and joblib launchers) starts a new one."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)

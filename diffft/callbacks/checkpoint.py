"""``last.ckpt`` at the end of training and on Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class LastCheckpoint(Checkpoint):
    """Writes ``dirpath/last.ckpt`` when training ends (inside the training processes, so a
    ``ddp_spawn`` run saves its ranks' own state) and when training is interrupted by Ctrl-C
    (``KeyboardInterrupt``), so every run leaves a resumable ``last.ckpt``.

    ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only at its own intervals; as a
    ``Checkpoint`` this callback runs after it (Lightning orders checkpoint callbacks last), so
    the file is the end of training. Other exceptions (a non-finite loss) save nothing: the last
    good checkpoint stays.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        if trainer.world_size > 1:  # saving has a barrier the interrupted ranks may not reach
            rank_zero_warn(f"interrupted: DDP run, {self.path} is the last periodic checkpoint")
            return
        trainer.save_checkpoint(self.path)
        rank_zero_info(f"interrupted: saved {self.path} (resume with ckpt_path={self.path})")

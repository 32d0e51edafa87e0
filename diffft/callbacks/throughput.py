"""Training throughput: batches per second after a warm-up, written by rank 0 (benchmarks)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


class Throughput(L.Callback):
    """Times training batches ``skip + 1 ...`` to the end (the first ones include set-up and
    DDP's first synchronisations) and writes ``{"batches", "seconds", "batches_per_s",
    "world_size"}`` to ``path`` when training ends (rank 0)."""

    def __init__(self, path: str | Path, skip: int = 100) -> None:
        self.path, self.skip = Path(path), skip
        self.batches, self.start = 0, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.batches += 1
        if self.batches == self.skip:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero or self.batches <= self.skip:
            return
        seconds = time.perf_counter() - self.start
        timed = self.batches - self.skip
        row = {"batches": timed, "seconds": seconds, "batches_per_s": timed / seconds}
        self.path.write_text(json.dumps({**row, "world_size": trainer.world_size}))

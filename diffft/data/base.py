"""The data protocol every method, the evaluator, the stages and the plots use.

A datamodule gives:

* ``event_shape``: the shape of one sample (``(D,)`` for points, ``(C, H, W)`` for images), which
  the methods and networks are built for (``dataset.event_shape``, filled in by
  ``diffft.train``);
* ``train`` / ``test``: the reference splits as tensors (``reference(split, n, seed)`` takes a
  seeded subset), and ``fresh(n, seed, reference)``: real samples independent of a split, for the
  metric floors;
* ``identity()``: what makes two runs' data the same (cache keys, stage checks);
* ``plot(samples, path)``: its own picture of samples (a scatter for 2-D points, a grid for
  images);
* ``metrics``: the evaluation metrics that suit it;
* a train loader whose data order follows the method's own batch counter (exact resume) and
  which shards the data over DDP ranks.

Data that fit in memory (toy points, the 8x8 digits) are one tensor whose batches are index
slices (``InMemoryBatches``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the key or path and the fix."""


def batches_per_epoch(rows: int, world_size: int, batch_size: int) -> int:
    """Batches each rank takes per epoch: its ``rows // world_size`` rows (the remainder is
    left out of the epoch), the last batch possibly short."""
    return -(-(rows // world_size) // batch_size)


class InMemoryBatches(IterableDataset):
    """Shuffled index-slice batches of one in-memory tensor; a new permutation every epoch.

    ``position_fn() -> (rank, world_size, batches done | None)`` (the trainer's rank and world
    size, the method's own batch counter) places every batch: epoch ``e`` uses the permutation
    seeded by ``(seed, e)``, and an iterator started after ``b`` batches starts at batch
    ``b mod len`` of epoch ``b div len``. So a run resumed from a mid-epoch checkpoint sees the
    same data order as an uninterrupted one. Without a counter, iterations are counted.

    Under DDP each rank takes every ``world_size``-th index of the same permutation, cut to a
    multiple of ``world_size`` first (the last ``n mod world_size`` rows of each epoch's
    permutation are left out, different rows every epoch): every rank yields the same number of
    batches, so the ranks' collectives stay in step.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        seed: int,
        position_fn: Callable[[], tuple[int, int, int | None]] | None = None,
    ) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.position_fn = 0, position_fn

    def _position(self) -> tuple[int, int, int | None]:
        return self.position_fn() if self.position_fn is not None else (0, 1, None)

    def __len__(self) -> int:
        _, world, _ = self._position()
        if self.data.shape[0] < world:
            raise DataError(
                f"{self.data.shape[0]} training rows cannot be split over {world} DDP ranks; "
                "use fewer trainer.devices or more data"
            )
        return batches_per_epoch(self.data.shape[0], world, self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, world, done = self._position()
        if done is None:
            epoch, start, self.epoch = self.epoch, 0, self.epoch + 1
        else:
            epoch, start = divmod(done, len(self))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        per_rank = self.data.shape[0] // world
        perm = torch.randperm(self.data.shape[0], generator=g)[: per_rank * world][rank::world]
        for i in range(start * self.batch_size, per_rank, self.batch_size):
            yield self.data[perm[i : i + self.batch_size]]


class PositionedLoader(DataLoader):
    """A ``DataLoader`` over ``InMemoryBatches`` that Lightning treats as resumable: its state is
    the batch count its data order follows (the method's own counter, restored with the
    method), so Lightning does not warn that a mid-epoch resume replays the epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.dataset._position()[2]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the position comes back with the method's counter (SamplerMethod.batches_done)


class InMemoryDataModule(L.LightningDataModule):
    """A datamodule whose splits are tensors in memory (``train``, ``test``), set by
    ``setup()``; subclasses fill them and implement ``identity``, ``fresh`` and ``plot``.

    ``event_shape`` given in the config (``dataset.event_shape``) is checked against the data.
    """

    name: str

    def __init__(
        self,
        batch_size: int,
        seed: int,
        metrics: Sequence[str],
        event_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.seed, self.metrics = batch_size, seed, list(metrics)
        self.expected_shape = tuple(int(d) for d in event_shape) if event_shape else None
        self.train: torch.Tensor | None = None
        self.test: torch.Tensor | None = None

    # -- the protocol ----------------------------------------------------------------------
    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        self.setup()
        return tuple(self.train.shape[1:])

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def training_settings(self) -> dict[str, Any]:
        """What a model trained on these data also depends on beyond their ``identity()``: the
        batch size and any augmentation (part of a cached stage's key)."""
        return {"batch_size": self.batch_size, "hflip": bool(getattr(self, "hflip", False))}

    def fresh(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        raise NotImplementedError

    def resample_other_split(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        """``n`` rows of the split that is not ``reference`` (without replacement when it has
        ``n``, else with): real data independent of ``reference`` for a finite dataset."""
        self.setup()
        pool = self.test if reference == "train" else self.train
        g = torch.Generator().manual_seed(seed)
        if pool.shape[0] >= n:
            return pool[torch.randperm(pool.shape[0], generator=g)[:n]]
        return pool[torch.randint(0, pool.shape[0], (n,), generator=g)]

    def plot(self, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
        raise NotImplementedError

    def reference(self, split: str, n: int | None = None, seed: int = 0) -> torch.Tensor:
        """The ``split`` (``train`` | ``test``), or a seeded subset of ``n`` of its samples."""
        self.setup()
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}; expected 'train' or 'test'")
        data = self.train if split == "train" else self.test
        if n is None or n >= data.shape[0]:
            return data
        g = torch.Generator().manual_seed(seed)
        return data[torch.randperm(data.shape[0], generator=g)[:n]]

    def check_event_shape(self, source: str) -> None:
        """Raise when the configured ``dataset.event_shape`` is not the data's."""
        if self.expected_shape is not None and self.expected_shape != self.event_shape:
            raise DataError(
                f"dataset.event_shape={list(self.expected_shape)} but {source} has samples of "
                f"shape {list(self.event_shape)}; set dataset.event_shape=null (the data's own)"
            )

    # -- training batches -----------------------------------------------------------------
    def _position(self) -> tuple[int, int, int | None]:
        """(rank, world size, batches done) from the trainer and its method (the method's own
        counter, ``SamplerMethod.batches_done``; the trainer's epoch x length without one)."""
        trainer = self.trainer
        if trainer is None:  # a loader used outside a trainer (e.g. passed to fit directly)
            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size(), None
            return 0, 1, None
        done = getattr(trainer.lightning_module, "batches_done", None)
        if done is None:
            n = batches_per_epoch(self.train.shape[0], trainer.world_size, self.batch_size)
            done = trainer.current_epoch * n
        return trainer.global_rank, trainer.world_size, int(done)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        batches = InMemoryBatches(self.train, self.batch_size, self.seed, self._position)
        return PositionedLoader(batches, batch_size=None, num_workers=0)

"""Toy 2-D datasets held in memory as one tensor; batches are index slices.

Generators follow the papers' setups: swiss roll as in the SFT-PG toy code, 8 gaussians and
checkerboard as in FFJORD (the DxMI 2-D setup). ``points_file`` loads a user's ``.npy``/``.csv``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import make_swiss_roll
from torch.utils.data import DataLoader, IterableDataset


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the key or path and the fix."""


def swiss_roll(n: int, seed: int) -> np.ndarray:
    """SFT-PG: ``make_swiss_roll(n, noise=0.05)``, columns [0, 2], divided by 20."""
    x, _ = make_swiss_roll(n, noise=0.05, random_state=seed)
    return x[:, [0, 2]] / 20


def eight_gaussians(n: int, seed: int) -> np.ndarray:
    """FFJORD/DxMI: 8 modes on a circle of radius 4, std 0.5, then divided by 1.414."""
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(2)
    centers = 4 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    x = 0.5 * rng.standard_normal((n, 2)) + centers[rng.integers(0, 8, n)]
    return x / 1.414


def checkerboard(n: int, seed: int) -> np.ndarray:
    """FFJORD checkerboard on [-4, 4]^2 (8 filled squares of side 2)."""
    rng = np.random.default_rng(seed)
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


GENERATORS: dict[str, Callable[[int, int], np.ndarray]] = {
    "swiss_roll": swiss_roll,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


def load_points_file(path: str | Path) -> np.ndarray:
    """A user's ``N x D`` array from ``.npy`` or ``.csv`` (comma separated, optional header)."""
    path = Path(path)
    what = "a .npy or .csv array of shape N x D (N >= 2 rows of finite numbers)"
    if not path.is_file():
        raise DataError(f"dataset.path: no such file '{path}'; expected {what}")
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            try:
                x = np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError:
                x = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
        else:
            raise DataError(f"dataset.path: '{path}' has suffix '{path.suffix}'; expected {what}")
    except (ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"dataset.path: cannot read '{path}' ({err}); expected {what}") from err
    if x.ndim != 2 or x.shape[0] < 2:
        raise DataError(f"dataset.path: '{path}' has shape {x.shape}; expected {what}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"dataset.path: '{path}' has dtype {x.dtype}; expected {what}")
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise DataError(
            f"dataset.path: '{path}' has {int(bad.sum())} NaN/inf values (first in row {row}); "
            "remove or impute them"
        )
    return x


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


class ToyDataModule(L.LightningDataModule):
    """Low-dimensional point data: a named generator or a points file.

    Args:
        name: a key of ``GENERATORS`` or ``points_file``.
        dim: expected dimension D (checked against the data); None = the data's own (a points
            file's column count).
        n_train / n_test: sizes drawn from a generator (ignored for files).
        test_fraction: share of a points file held out as test set (seeded split).
        path: the points file (``name=points_file``).
        metrics: names of the evaluation metrics that suit this data (``diffft.evaluation``).
    """

    def __init__(
        self,
        name: str,
        dim: int | None = 2,
        n_train: int = 10_000,
        n_test: int = 10_000,
        batch_size: int = 128,
        seed: int = 0,
        path: str | None = None,
        test_fraction: float = 0.2,
        metrics: list[str] | tuple[str, ...] = ("sw", "w2"),
    ) -> None:
        super().__init__()
        if name != "points_file" and name not in GENERATORS:
            raise DataError(
                f"dataset.name: unknown dataset {name!r}; expected one of "
                f"{sorted(GENERATORS) + ['points_file']}"
            )
        if name == "points_file" and not path:
            raise DataError("dataset.path is empty; set dataset.path=FILE (.npy or .csv, N x D)")
        self.name, self.dim, self.path = name, dim, path
        self.n_train, self.n_test, self.test_fraction = n_train, n_test, test_fraction
        self.batch_size, self.seed = batch_size, seed
        self.metrics = list(metrics)
        self.train: torch.Tensor | None = None
        self.test: torch.Tensor | None = None
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs' data the same: the generator and its sizes and seed, or the
        points file's absolute path and content hash with the split settings. Keys the stage
        cache and the check that a reused model or summary row was trained on this data."""
        if self._identity is None:
            if self.name == "points_file":
                path = Path(self.path).resolve()
                if not path.is_file():
                    load_points_file(path)  # raises the DataError that names the path
                digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
                ident = {"path": str(path), "sha1": digest, "test_fraction": self.test_fraction}
            else:
                ident = {"n_train": self.n_train, "n_test": self.n_test}
            self._identity = {"name": self.name, **ident, "seed": self.seed}
        return self._identity

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.name == "points_file":
            x = load_points_file(self.path)
            perm = np.random.default_rng(self.seed).permutation(len(x))
            n_test = max(1, int(round(self.test_fraction * len(x))))
            train, test = x[perm[n_test:]], x[perm[:n_test]]
        else:
            # Disjoint seeds: training set, test set and fresh floor samples are independent.
            train = GENERATORS[self.name](self.n_train, self.seed)
            test = GENERATORS[self.name](self.n_test, self.seed + 1_000_000)
        if self.dim is None:
            self.dim = int(train.shape[1])
        elif train.shape[1] != self.dim:
            source = f"'{self.path}'" if self.path else self.name
            raise DataError(
                f"dataset.dim={self.dim} but {source} has {train.shape[1]} columns; "
                f"set dataset.dim={train.shape[1]} (or dataset.dim=null to take the file's)"
            )
        self.train = torch.as_tensor(train, dtype=torch.float32)
        self.test = torch.as_tensor(test, dtype=torch.float32)

    def fresh(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        """``n`` real points independent of the ``reference`` split, for metric floors.

        Generators draw new points. For a file, the other split is resampled without
        replacement (with replacement only when it is smaller than ``n``).
        """
        self.setup()
        if self.name != "points_file":
            return torch.as_tensor(GENERATORS[self.name](n, 2_000_000 + seed), dtype=torch.float32)
        pool = self.test if reference == "train" else self.train
        g = torch.Generator().manual_seed(seed)
        if pool.shape[0] >= n:
            return pool[torch.randperm(pool.shape[0], generator=g)[:n]]
        return pool[torch.randint(0, pool.shape[0], (n,), generator=g)]

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

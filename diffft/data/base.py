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

**Units** (``dataset.normalize``). Users bring points at any scale, but a recipe's step sizes,
noise schedule and critic are tuned for data of roughly unit scale. With ``normalize:
standard`` the model trains in *model units*: the data minus a per-dimension mean, divided by
one scalar scale (``Normalization``, fitted on the training split only; one scalar keeps a
shape's aspect ratio). Everything a user sees speaks the data's own *data units*. The line
between them:

* model units: ``train`` / ``test`` / ``reference()`` and the training batches (what training
  code and the methods read), and every sampler's output and every energy's input;
* data units: ``split(name)`` and ``fresh()`` (the evaluation's references and floors),
  ``plot``'s picture, ``diffft.sample``'s output and ``diffft.score``'s input.

``to_model`` / ``to_data`` convert; the statistics are part of ``identity()`` (so of every
checkpoint, as ``diffft_data``, and of every stage key). With ``normalize: none`` (the shipped
sets, images) the two units are the same and nothing is converted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger("diffft")

NORMALIZE = ("standard", "none")
# The data scales the shipped recipes are tuned for lie in ~[0.3, 3] (swiss roll 0.34, 8
# gaussians 2.0, checkerboard 2.3): outside [SCALE_LOW, SCALE_HIGH] a recipe is far off its range.
SCALE_LOW, SCALE_HIGH = 0.05, 50.0
_warned: set[str] = set()  # the data whose scale warning this process has logged


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the key or path and the fix."""


def data_scale(x: torch.Tensor) -> float:
    """The RMS distance of the centred points per dimension: ``sqrt(mean((x - mean)^2))`` over
    points and dimensions (float64): one number for the whole shape, so that dividing by it
    keeps the aspect ratio."""
    x = x.double().flatten(1)
    return float((x - x.mean(0)).pow(2).mean().sqrt())


def check_image_normalize(normalize: str) -> None:
    """Images stay as they are: they are already in [-1, 1], which the samplers' clipping, the
    PNG writer and the image metrics assume."""
    if normalize != "none":
        raise DataError(
            f"dataset.normalize={normalize}: images are already in [-1, 1] and are not "
            "normalised; set dataset.normalize=none"
        )


def check_scale(train: torch.Tensor, source: str) -> float:
    """Warn (once per data per process) when un-normalised points are far from the scale the
    recipes are tuned for: a recipe then trains "fine" and gives useless numbers (a x1000
    points file: SFT-PG 2044 vs a floor of 166, critic loss -5e6). Returns the scale."""
    scale = data_scale(train)
    if not SCALE_LOW <= scale <= SCALE_HIGH and source not in _warned:
        _warned.add(source)
        log.warning(
            "%s: the training points have scale %.3g (RMS distance from their mean), outside "
            "[%g, %g]: far from the data the recipes are tuned for (swiss roll 0.34, 8 "
            "gaussians 2.0), so their step sizes, noise schedules and critics will not fit. Set "
            "dataset.normalize=standard (train in normalised units, report in the data's own)",
            source,
            scale,
            SCALE_LOW,
            SCALE_HIGH,
        )
    return scale


@dataclass(frozen=True)
class Normalization:
    """``model = (data - shift) / scale``: a per-dimension shift and one scalar scale.

    Built by ``fit`` from a training split, or ``from_identity`` from a data identity (e.g. a
    checkpoint's ``diffft_data``), so sampling and scoring need nothing but the checkpoint."""

    shift: tuple[float, ...]
    scale: float

    @classmethod
    def fit(cls, train: torch.Tensor) -> Normalization:
        """The training split's mean and ``data_scale`` (float64; a constant split gets scale 1
        rather than a division by zero)."""
        flat = train.double().flatten(1)
        scale = data_scale(flat)
        return cls(tuple(flat.mean(0).tolist()), scale if scale > 0 else 1.0)

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any] | None) -> Normalization | None:
        """The normalisation an identity records (``identity["normalize"]``), or None."""
        spec = (identity or {}).get("normalize")
        return None if not spec else cls(tuple(spec["shift"]), float(spec["scale"]))

    def as_identity(self) -> dict[str, Any]:
        return {"shift": list(self.shift), "scale": self.scale}

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor(self.shift, dtype=torch.float64)
        return shift.view(x.shape[1:]).to(x.device, x.dtype)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Data units -> model units (any float dtype and device; ``[n, *event_shape]``)."""
        return (x - self._shift(x)) / self.scale

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Model units -> data units."""
        return x * self.scale + self._shift(x)


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

    ``train`` / ``test`` are in model units (see the module docstring): a subclass that
    normalises sets them with ``set_splits``, which keeps the data-unit splits for ``split``.
    ``event_shape`` given in the config (``dataset.event_shape``) is checked against the data.
    """

    name: str

    def __init__(
        self,
        batch_size: int,
        seed: int,
        metrics: Sequence[str],
        event_shape: Sequence[int] | None = None,
        normalize: str = "none",
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZE:
            raise DataError(f"dataset.normalize={normalize!r}; expected one of {NORMALIZE}")
        self.batch_size, self.seed, self.metrics = batch_size, seed, list(metrics)
        self.expected_shape = tuple(int(d) for d in event_shape) if event_shape else None
        self.normalize = normalize
        self.norm: Normalization | None = None  # set by set_splits with normalize=standard
        self.train: torch.Tensor | None = None
        self.test: torch.Tensor | None = None
        self._data_splits: dict[str, torch.Tensor] = {}

    # -- units ------------------------------------------------------------------------------
    def set_splits(self, train: torch.Tensor, test: torch.Tensor, source: str) -> None:
        """Set the splits from data-unit tensors: with ``normalize: standard`` fit the
        normalisation on ``train`` alone (the test split must not leak into what the model
        sees) and keep both units; with ``none`` check that the data's scale suits the recipes
        (``source`` names the data in the warning)."""
        if self.normalize == "standard":
            self.norm = Normalization.fit(train)
            self._data_splits = {"train": train, "test": test}
            train, test = self.norm.to_model(train), self.norm.to_model(test)
        else:
            check_scale(train, source)
        self.train, self.test = train, test

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Data units -> model units (``x`` itself without a normalisation)."""
        self.setup()
        return x if self.norm is None else self.norm.to_model(x)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Model units (a sampler's output) -> data units (``x`` itself without one)."""
        self.setup()
        return x if self.norm is None else self.norm.to_data(x)

    def split(self, name: str, units: str = "data") -> torch.Tensor:
        """The ``train`` or ``test`` split in ``data`` units (the evaluation's references) or
        ``model`` units (``self.train`` / ``self.test``)."""
        self.setup()
        if name not in ("train", "test") or units not in ("data", "model"):
            raise ValueError(f"split({name!r}, {units!r}): expected train|test, data|model")
        if units == "data" and self.norm is not None:
            return self._data_splits[name]
        return self.train if name == "train" else self.test

    def normalization_identity(self) -> dict[str, Any]:
        """``{"normalize": {"shift": [...], "scale": s}}`` with ``normalize: standard``, else
        ``{}`` (so the identity, and every cache key, of un-normalised data is unchanged)."""
        if self.normalize != "standard":
            return {}
        self.setup()
        return {"normalize": self.norm.as_identity()}

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
        ``n``, else with), in data units: real data independent of ``reference`` for a finite
        dataset (the metric floors)."""
        pool = self.split("test" if reference == "train" else "train")
        g = torch.Generator().manual_seed(seed)
        if pool.shape[0] >= n:
            return pool[torch.randperm(pool.shape[0], generator=g)[:n]]
        return pool[torch.randint(0, pool.shape[0], (n,), generator=g)]

    def plot(self, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
        """A picture of ``samples`` (model units, as samplers draw them) in data units."""
        raise NotImplementedError

    def reference(self, split: str, n: int | None = None, seed: int = 0) -> torch.Tensor:
        """The ``split`` (``train`` | ``test``) in model units (what training code compares
        with, e.g. the encoder's retrieval check), or a seeded subset of ``n`` of its
        samples."""
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

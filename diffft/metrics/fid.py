"""FID and KID (torchmetrics) and precision / recall (torch-fidelity) of image samples, on a
configured feature network.

Two feature extractors (``eval.features``), and every reported number names its extractor:

* ``offline`` (default): a small CNN classifier this project trains on the dataset's training
  split (its labels; e.g. the digits' 10 classes) and caches per dataset identity under
  ``paths.cache_dir/features``. Its penultimate layer (``num_features`` values) is the feature.
  Numbers are comparable only between runs that use the same cached extractor (same data
  identity, same ``EXTRACTOR_VERSION``), never with published Inception FIDs.
* ``inception``: torchmetrics' Inception-v3 (the standard FID network) from a *local* weights
  file ``eval.inception_weights`` (torch-fidelity's ``pt_inception-2015-12-05`` file); nothing
  is downloaded. Needs torch-fidelity (and torchvision) installed.

The floor is the same metric between an independent real sample (the other split) and the
reference split, under the same extractor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffft.locks import file_lock

log = logging.getLogger("diffft")

EXTRACTOR_VERSION = 1  # bump when the classifier or its training changes (new cache entries)


class FeatureNet(nn.Module):
    """A small CNN classifier of ``[n, C, H, W]`` images in [-1, 1]; ``forward`` returns the
    ``num_features`` penultimate features (what FID/KID compare), ``logits`` the classes."""

    def __init__(self, event_shape: Sequence[int], classes: int, width: int = 16) -> None:
        super().__init__()
        c = int(event_shape[0])
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.num_features = 2 * width * 4
        self.head = nn.Linear(self.num_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def train_feature_net(
    train: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 10,
    seed: int = 0,
) -> tuple[FeatureNet, float]:
    """Train the classifier (Adam, cross-entropy, seeded); returns it and its test accuracy.
    (Called from inside evaluation, which runs under ``no_grad``.)"""
    with torch.enable_grad():
        return _train_feature_net(train, labels, test, test_labels, epochs, seed)


def _train_feature_net(
    train: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int,
    seed: int,
) -> tuple[FeatureNet, float]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(train.shape[1:], int(labels.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(train.shape[0], generator=g)
        for i in range(0, train.shape[0], 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net.logits(train[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net.logits(test).argmax(1) == test_labels).float().mean().item()
    return net.requires_grad_(False), acc


_LOCK = threading.Lock()  # rows of a table are scored in parallel threads


def offline_extractor(datamodule: Any, cache_dir: str | Path | None) -> FeatureNet:
    """The cached classifier of this dataset (trained on first use; ``datamodule`` needs
    ``train_labels`` / ``test_labels``)."""
    with _LOCK:
        cached = getattr(datamodule, "_feature_net", None)
        if cached is not None:
            return cached
        labels = getattr(datamodule, "train_labels", None)
        if labels is None:
            raise ValueError(
                f"eval.features=offline trains a classifier on the labels of the training split, "
                f"but dataset {datamodule.name!r} has none; use eval.features=inception with "
                "eval.inception_weights=FILE"
            )
        ident = json.dumps([datamodule.identity(), EXTRACTOR_VERSION], sort_keys=True)
        key = f"{datamodule.name}-" + hashlib.sha1(ident.encode()).hexdigest()[:12]
        path = Path(cache_dir) / "features" / f"{key}.pt" if cache_dir else None
        net = FeatureNet(datamodule.event_shape, int(labels.max()) + 1)
        if path is None:
            net, _ = train_feature_net(datamodule.train, labels, datamodule.test,
                                       datamodule.test_labels)  # fmt: skip
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(path.with_suffix(".lock"), f"feature network {key}"):
                if not path.is_file():
                    trained, acc = train_feature_net(
                        datamodule.train, labels, datamodule.test, datamodule.test_labels
                    )
                    log.info("eval.features=offline: trained %s (test accuracy %.3f)", key, acc)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    torch.save({"state_dict": trained.state_dict(), "test_accuracy": acc}, tmp)
                    os.replace(tmp, path)
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["state_dict"])
            net.test_accuracy = saved["test_accuracy"]
        datamodule._feature_net = net.eval().requires_grad_(False)
        return datamodule._feature_net


def inception_extractor(weights: str | None) -> int:
    """Check the local Inception weights file; torchmetrics builds the network from it."""
    if not weights or not Path(weights).expanduser().is_file():
        raise FileNotFoundError(
            f"eval.inception_weights={weights!r}: no such file. FID/KID with Inception need a "
            "local copy of torch-fidelity's weights (pt_inception-2015-12-05-6726825d.pth), "
            "downloaded beforehand: nothing is fetched at run time. Or use eval.features=offline"
        )
    return 2048


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as [0, 1] with 3 channels (Inception's input)."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def image_metric(
    kind: str,
    fake: torch.Tensor,
    real: torch.Tensor,
    features: str,
    datamodule: Any,
    cache_dir: str | Path | None,
    inception_weights: str | None = None,
    kid_subset: int = 100,
    seed: int = 0,
) -> float:
    """``fid``, ``kid`` (the mean over subsets), ``precision`` or ``recall`` (Kynkaanniemi et
    al. 2019, k = 3, through torch-fidelity) of ``fake`` against ``real`` images; KID's random
    subsets are drawn with ``seed``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if kind in ("precision", "recall"):
        return precision_recall(fake, real, features, datamodule, cache_dir, inception_weights)[
            kind
        ]

    if features == "offline":
        net: Any = offline_extractor(datamodule, cache_dir)
        kwargs: dict[str, Any] = {"feature": net, "normalize": True}
        prep = lambda x: x.float()  # noqa: E731  (the classifier takes [-1, 1] images)
    elif features == "inception":
        path = str(Path(inception_weights).expanduser()) if inception_weights else None
        inception_extractor(path)
        kwargs = {"feature": 2048, "normalize": True, "feature_extractor_weights_path": path}
        prep = _to_unit
    else:
        raise ValueError(f"eval.features={features!r}; expected 'offline' or 'inception'")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        if kind == "fid":
            metric = FrechetInceptionDistance(**kwargs)
        else:
            n = min(fake.shape[0], real.shape[0])
            metric = KernelInceptionDistance(subset_size=min(kid_subset, n), **kwargs)
        for x, is_real in ((real, True), (fake, False)):
            for i in range(0, x.shape[0], 1000):
                metric.update(prep(x[i : i + 1000]), real=is_real)
        with _LOCK, torch.random.fork_rng():  # KID draws its subsets from torch's global RNG
            torch.manual_seed(seed)
            value = metric.compute()
    return float(value[0] if isinstance(value, tuple) else value)


def feature_extractor(
    features: str,
    datamodule: Any,
    cache_dir: str | Path | None,
    inception_weights: str | None = None,
) -> Any:
    """``x [-1, 1] images -> [n, d]`` features on the configured extractor (the networks the
    FID / KID above use), built once for a whole comparison."""
    if features == "offline":
        net: Any = offline_extractor(datamodule, cache_dir)
        prep = lambda b: b.float()  # noqa: E731
    elif features == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = str(Path(inception_weights).expanduser()) if inception_weights else None
        inception_extractor(path)
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
        )
        prep = lambda b: (_to_unit(b) * 255).round().to(torch.uint8)  # noqa: E731
    else:
        raise ValueError(f"eval.features={features!r}; expected 'offline' or 'inception'")

    def extract(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [net(prep(x[i : i + 1000])).float() for i in range(0, x.shape[0], 1000)]
            )

    return extract


def precision_recall(
    fake: torch.Tensor,
    real: torch.Tensor,
    features: str,
    datamodule: Any,
    cache_dir: str | Path | None,
    inception_weights: str | None = None,
    neighborhood: int = 3,
) -> dict[str, float]:
    """Improved precision and recall (k-NN balls in feature space) of ``fake`` vs ``real``:
    ``torch_fidelity.metric_prc`` on our extractor's features (deterministic: no sampling)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    extract = feature_extractor(features, datamodule, cache_dir, inception_weights)
    f_fake, f_real = extract(fake), extract(real)  # one extractor (Inception loads once)
    out = prc_features_to_metric(
        f_fake, f_real, prc_neighborhood=neighborhood, prc_batch_size=10_000,
        save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}

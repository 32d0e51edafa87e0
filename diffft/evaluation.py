"""Evaluation: sample from a chain, compute the dataset's metrics, report them beside the floor.

The floor of a metric is the same metric between two independent real-data samples of the same
size (``datamodule.fresh`` vs the metric's reference split). It is computed once per (dataset,
sample size, metric, floor draws) and cached as JSON.

The floor is estimated from more draws (``floor_draws``) than a model's evaluation: single-draw
values are skewed (swiss roll, sw, 100 draws: 0.0035 to 0.0123, mean 0.0068, sd 0.0018; see
``experiments/floor_draws.py``), and a few draws give an unreliable mean and a far too small sd
(the first 3 draws: 0.0051 ± 0.0004), which is what "reaches the floor" (mean <= floor mean +
one floor sd) is judged against.

Units: a model may train on normalised data (``dataset.normalize``, ``diffft.data.base``), but
every number is in the data's own units: samples are converted to data units before any metric,
the references and the floors are data-unit splits (so a floor does not depend on the
normalisation), and an energy (which takes model units) is wrapped to take data-unit points.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffft.diffusion.sampler import Sampler
from diffft.locks import file_lock
from diffft.metrics.auc import energy_auc, kde_energy, uniform_box
from diffft.metrics.fid import EXTRACTOR_VERSION, image_metric
from diffft.metrics.ot import exact_w2, mean_sd, sliced_w2

Energy = Callable[[torch.Tensor], torch.Tensor]

log = logging.getLogger("diffft")
_warned_boxes: set[str] = set()  # (data, box) pairs whose misfit this process has logged


@dataclass(frozen=True)
class Metric:
    """``scores: samples``: ``fn(samples, reference split, draw seed)``; ``scores: energy``: the
    metric scores a method's energy (``fn(energy, reference split, draw, evaluator, device)``),
    and rows without an energy (a DDPM, a solver) have no value; ``scores: images``: an image
    metric on a feature network (``fn(samples, reference split, draw, evaluator)``, unflattened;
    its label names the evaluator's extractor)."""

    fn: Callable[..., float]
    reference: str  # "train" or "test": the real split the samples are compared with
    scale: float
    label: str
    scores: str = "samples"
    better: str = "min"  # the direction a checkpoint monitor on it selects


def _auc(energy: Energy, test: torch.Tensor, draw: int, ev: Evaluator, device: Any) -> float:
    lo, hi = ev.auc_box()
    noise = uniform_box(test.shape[0], lo, hi, draw).view(-1, *test.shape[1:])
    return energy_auc(energy, test, noise, device)


def _image(kind: str) -> Callable[..., float]:
    def fn(x: torch.Tensor, ref: torch.Tensor, draw: int, ev: Evaluator) -> float:
        return image_metric(
            kind, x, ref, ev.features, ev.dm, ev.cache_dir, ev.inception_weights, seed=draw
        )

    return fn


def _sw(n_projections: int) -> Callable[..., float]:
    return lambda x, y, seed: sliced_w2(x, y, n_projections=n_projections, seed=seed)


METRICS: dict[str, Metric] = {
    # SFT-PG Table 1: sliced W2, 100 projections, generated vs the training set, x1e-2.
    "sw_paper": Metric(_sw(100), "train", 1e2, "SW2 100 proj vs train (x1e-2)"),
    # DxMI Table 1: sliced W2, 1000 projections, 10K generated vs 10K test points.
    "sw": Metric(_sw(1000), "test", 1.0, "SW2 1000 proj vs test"),
    "w2": Metric(lambda x, y, seed: exact_w2(x, y), "test", 1e2, "exact W2 vs test (x1e-2)"),
    # DxMI Table 1: AUC of the energy, 10K test points vs 10K uniform over the data's box.
    # Its "data floor" row is an ideal (higher is better): a KDE of an independent real sample.
    "auc": Metric(
        _auc, "test", 1.0, "energy AUC test vs uniform (floor row: KDE ideal)", "energy", "max"
    ),
    # Images: FID / KID of the samples vs the test split on eval.features.
    "fid": Metric(_image("fid"), "test", 1.0, "FID vs test ({features})", "images"),
    "kid": Metric(_image("kid"), "test", 1.0, "KID vs test ({features})", "images"),
    # Improved precision / recall (k = 3) vs test on the same extractor: higher is better.
    "precision": Metric(
        _image("precision"), "test", 1.0, "precision vs test ({features})", "images", "max"
    ),
    "recall": Metric(_image("recall"), "test", 1.0, "recall vs test ({features})", "images", "max"),
}


def metric_label(name: str, features: str | None) -> str:
    """A metric's column label; an image metric's names its feature network (``eval.features``,
    e.g. ``FID vs test (offline features)``; ``None``: unnamed)."""
    return METRICS[name].label.format(features=f"{features} features" if features else "features")


# Points of the real sample the "auc" floor's KDE is fitted to, and its draws (a 10K x 20K KDE
# evaluation takes ~6 s).
AUC_FLOOR_POINTS = 5_000
AUC_FLOOR_DRAWS = 10


def check_metrics(names: list[str]) -> None:
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"eval.metrics: unknown {unknown}; expected names from {sorted(METRICS)}")


class Evaluator:
    """Computes ``metrics`` over ``draws`` independent samplings of ``n`` points each.

    Args:
        datamodule: a ``ToyDataModule`` (``train``, ``test``, ``fresh``).
        metrics: names from ``METRICS``.
        n: points per draw (10K in both papers). w2_points: points used by exact W2 (its cost
            grows ~n^3; 10K takes ~30 s and several GB).
        seed: draw d uses sampling seed ``seed + d`` and projection seed ``d``.
        floor_draws: draws of the floor (None = ``draws``); its cost is one metric call each.
        cache_dir: where floors are cached (None = no cache).
        batch_size: samples drawn per sampler call (None = all ``n`` at once).
        auc_box: ``[lo, hi]`` of the uniform noise of the ``auc`` metric in every dimension,
            in data units (None = the bounding box of the training split in data units, so it
            follows the data; a box that does not fit the data is used with a warning).
        features: the feature network of the image metrics: ``offline`` (a classifier trained
            on the training split, cached) or ``inception`` (from ``inception_weights``, a local
            file); see ``diffft.metrics.fid``.
    """

    def __init__(
        self,
        datamodule,
        metrics: list[str],
        n: int = 10_000,
        draws: int = 5,
        seed: int = 12345,
        w2_points: int = 2_000,
        cache_dir: str | Path | None = None,
        floor_draws: int | None = None,
        batch_size: int | None = None,
        auc_box: list[float] | None = None,
        features: str = "offline",
        inception_weights: str | None = None,
    ) -> None:
        check_metrics(list(metrics))
        images = [m for m in metrics if METRICS[m].scores == "images"]
        if images and len(datamodule.event_shape) != 3:
            raise ValueError(
                f"eval.metrics: {images} score images [C, H, W], but dataset "
                f"{datamodule.name!r} has samples of shape {list(datamodule.event_shape)}; use "
                "sw / w2 for points"
            )
        self.features, self.inception_weights = features, inception_weights
        self.box = auc_box
        self.dm, self.metrics, self.n, self.draws = datamodule, list(metrics), n, draws
        self.floor_draws = floor_draws or draws
        self.seed, self.w2_points = seed, w2_points
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size

    def labels(self) -> dict[str, str]:
        """Column labels of the metrics (an image metric's names its feature network)."""
        return {m: metric_label(m, self.features) for m in self.metrics}

    def _points(self, name: str) -> int:
        return min(self.n, self.w2_points) if name == "w2" else self.n

    def auc_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension bounds of the ``auc`` metric's uniform noise."""
        if self.box is not None:
            if len(self.box) != 2 or not self.box[0] < self.box[1]:
                raise ValueError(f"eval.auc_box={list(self.box)}; expected [lo, hi] with lo < hi")
            dim = self.dm.train[0].numel()
            lo, hi = torch.full((dim,), float(self.box[0])), torch.full((dim,), float(self.box[1]))
            self._check_box(lo, hi)
            return lo, hi
        flat = self.dm.split("train").flatten(1)
        return flat.min(0).values.float(), flat.max(0).values.float()

    def _check_box(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Warn once when a fixed box does not fit the data: it misses over 1% of the training
        points, or is over 10x wider than their bounding box in some dimension. A recipe's box
        is its own data's domain (8 gaussians: [-4, 4]); on other data the uniform noise then
        lies inside the data (AUC near 0.5 whatever the energy) or far around it (near 1)."""
        data = self.dm.split("train").flatten(1).float()
        inside = ((data >= lo) & (data <= hi)).all(1).float().mean().item()
        extent = (data.max(0).values - data.min(0).values).clamp_min(1e-12)
        wide = ((hi - lo) / extent).max().item()
        key = repr((sorted(self.dm.identity().items()), self.box))
        if (inside < 0.99 or wide > 10) and key not in _warned_boxes:
            _warned_boxes.add(key)
            log.warning(
                "eval.auc_box=%s does not fit these data (it holds %.1f%% of the training points "
                "and is up to %.3g x wider than their bounding box [%s, %s]): the auc values "
                "measure the box, not the energy. Set eval.auc_box=null (the training split's "
                "bounding box, in the data's units)",
                list(self.box),
                100 * inside,
                wide,
                [round(v, 4) for v in data.min(0).values.tolist()],
                [round(v, 4) for v in data.max(0).values.tolist()],
            )

    def _score(self, name: str, x: torch.Tensor | Energy, draw: int, device: Any = "cpu") -> float:
        """``x``: samples in data units, or for an energy metric an energy of data-unit points
        (evaluated on ``device``)."""
        metric = METRICS[name]
        ref = self.dm.split(metric.reference)
        if metric.scores == "energy":
            return metric.scale * metric.fn(x, ref[: self.n], draw, self, device)
        if metric.scores == "images":
            return metric.scale * metric.fn(x.detach().cpu(), ref, draw, self)
        m = self._points(name)
        if m < ref.shape[0] and name == "w2":
            ref = ref[torch.randperm(ref.shape[0], generator=torch.Generator().manual_seed(draw))]
            ref = ref[:m]
        # the OT metrics compare flattened samples (D = prod(event_shape) values each)
        return metric.scale * metric.fn(x[:m].detach().cpu().flatten(1), ref.flatten(1), draw)

    def score(self, x: torch.Tensor, draw: int = 0) -> dict[str, float]:
        """Every metric of the samples ``x`` [n, *event_shape] in data units against its
        reference split (draw ``draw``'s projections / W2 subset)."""
        return {name: self._score(name, x, draw) for name in self.metrics}

    @torch.no_grad()
    def evaluate(
        self, sampler: Sampler, draws: int | None = None, energy: Energy | None = None
    ) -> dict[str, list[float]]:
        """Metric values per draw for samples of ``sampler`` (drawn in eval mode); energy
        metrics score ``energy`` (none without one: their lists stay empty). Both work in model
        units; the samples are converted to data units, and the energy gets its points
        converted to model units."""
        out: dict[str, list[float]] = {m: [] for m in self.metrics}
        if energy is not None and self.dm.norm is not None:
            energy = _in_model_units(energy, self.dm.to_model)
        module = sampler if isinstance(sampler, torch.nn.Module) else None
        training = module.training if module is not None else False
        if module is not None:
            module.eval()  # dropout / normalisation layers sample as they will be used
        try:
            for d in range(draws or self.draws):
                g = torch.Generator(device=sampler.device).manual_seed(self.seed + d)
                x = self.dm.to_data(sampler.sample(self.n, generator=g, batch_size=self.batch_size))
                for name in self.metrics:
                    if METRICS[name].scores == "energy":
                        if energy is not None:
                            out[name].append(self._score(name, energy, d, sampler.device))
                    else:
                        out[name].append(self._score(name, x, d))
        finally:
            if module is not None:
                module.train(training)
        return out

    def floor(self) -> dict[str, list[float]]:
        """Metric values per draw between fresh real data and the reference split (cached)."""
        self.dm.setup()
        out = {}
        for name in self.metrics:
            key = self._cache_key(name)
            if self.cache_dir is None:
                out[name] = self._floor_values(name)
                continue
            path = self.cache_dir / "floors" / f"{key}.json"
            # Parallel runs (a run and its background stage) compute a floor once.
            with file_lock(path.with_suffix(".lock"), f"floor {key}"):
                if not path.is_file():
                    values = self._floor_values(name)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # readers see whole files
                    tmp.write_text(json.dumps({"metric": name, "values": values}))
                    os.replace(tmp, path)
            out[name] = json.loads(path.read_text())["values"]
        return out

    def _floor_values(self, name: str) -> list[float]:
        reference = METRICS[name].reference
        if METRICS[name].scores == "energy":  # an energy that knows only a real sample (CPU)
            draws = range(min(self.floor_draws, AUC_FLOOR_DRAWS))
            fresh = lambda d: self.dm.fresh(min(self.n, AUC_FLOOR_POINTS), d, reference)  # noqa: E731
            return [self._score(name, kde_energy(fresh(d)), d) for d in draws]
        return [
            self._score(name, self.dm.fresh(self._points(name), d, reference), d)
            for d in range(self.floor_draws)
        ]

    def _cache_key(self, name: str) -> str:
        # A moved file is the same data; a floor is in data units, so the normalisation is not
        # part of it either.
        data = {k: v for k, v in self.dm.identity().items() if k not in ("path", "normalize")}
        ident = [sorted(data.items()), name, self._points(name), self.floor_draws]
        if METRICS[name].scores == "energy":  # the KDE's sample size and draws too
            ident += [[t.tolist() for t in self.auc_box()], "kde", AUC_FLOOR_POINTS]
            ident[3] = min(self.floor_draws, AUC_FLOOR_DRAWS)
        if METRICS[name].scores == "images":  # the feature network
            ident += [self.features, self.inception_weights, EXTRACTOR_VERSION]
        return f"{self.dm.name}-{name}-" + hashlib.sha1(repr(ident).encode()).hexdigest()[:12]


def _in_model_units(energy: Energy, to_model: Callable[[torch.Tensor], torch.Tensor]) -> Energy:
    """``energy`` (of model-unit points) as an energy of data-unit points."""
    return lambda x: energy(to_model(x))


def format_table(
    rows: dict[str, dict[str, list[float]]],
    metrics: list[str],
    references: dict[str, dict[str, float]] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """A markdown table: one row per sampler (and the floor), ``mean ± sd`` per metric, plus
    the reference value (paper / baseline) where one is given; ``labels``: column labels
    (default: the metrics' own)."""
    references, labels = references or {}, labels or {}
    head = ["model"] + [labels.get(m, METRICS[m].label) for m in metrics] + ["reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, values in rows.items():
        cells = [name]
        for m in metrics:
            if not values.get(m):  # e.g. the energy AUC of a row without an energy
                cells.append("–")
                continue
            mu, sd = mean_sd(values[m])
            cells.append(f"{mu:.4g} ± {sd:.2g}")
        ref = references.get(name, {})
        cells.append(", ".join(f"{k} {v}" for k, v in ref.items()) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

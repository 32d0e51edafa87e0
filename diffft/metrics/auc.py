"""Energy AUC (DxMI Table 1): how well an energy separates test data from uniform noise.

The score of a point is its negative energy (an energy is low on data); the AUC of test data
(label 1) against as many points drawn uniformly over a box (label 0) is computed by
scikit-learn's ``roc_auc_score``. Its floor (the best an energy can do, up to estimation) is the
AUC of the negative log-density of a Gaussian KDE fitted to an independent real sample
(``kde_energy``): the same metric with an energy that only knows the data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import gaussian_kde
from sklearn.metrics import roc_auc_score


def uniform_box(n: int, lo: torch.Tensor, hi: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` points uniform over the box ``[lo, hi]`` (per-dimension bounds), seeded."""
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand((n, lo.numel()), generator=g, dtype=torch.float32)


@torch.no_grad()
def energy_auc(
    energy: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    noise: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 10_000,
) -> float:
    """AUC of ``-energy`` for ``data`` (positives) against ``noise`` (negatives)."""
    x = torch.cat([data, noise]).float()
    scores = torch.cat([energy(x[i : i + batch_size].to(device)).float().view(-1).cpu()
                        for i in range(0, x.shape[0], batch_size)])  # fmt: skip
    if not torch.isfinite(scores).all():
        return float("nan")
    labels = np.r_[np.ones(data.shape[0]), np.zeros(noise.shape[0])]
    return float(roc_auc_score(labels, -scores.double().numpy()))


def kde_energy(points: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The negative log-density of a Gaussian KDE (Scott's bandwidth) of ``points`` [n, ...]
    (flattened)."""
    kde = gaussian_kde(points.flatten(1).double().numpy().T)
    return lambda x: torch.from_numpy(-kde.logpdf(x.flatten(1).cpu().double().numpy().T))

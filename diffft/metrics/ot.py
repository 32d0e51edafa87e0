"""Wasserstein metrics on point clouds, built on POT (``import ot``).

Inputs are numpy arrays or torch tensors of shape ``[N, D]``; they are converted to float64 numpy.

* :func:`sliced_w2` -- sliced Wasserstein-2 exactly as POT defines it
  (``ot.sliced_wasserstein_distance(..., p=2)``), with POT's own seeded projections, so the value
  equals POT's for the same seed. The SFT-PG metric is ``sliced_w2`` with 100 projections against
  the training set (reported x1e-2); the DxMI metric uses 1000 projections, 10K vs 10K test points.
* :func:`exact_w2` -- exact W2 via the network simplex (``ot.emd2``), raising
  :class:`OTConvergenceError` instead of silently returning a non-optimal value.
* :func:`mean_sd` -- mean and sample standard deviation over repeated runs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import ot

__all__ = ["OTConvergenceError", "exact_w2", "mean_sd", "sliced_w2"]

# Upper bound on the elements of one [N, chunk] block of projected points (float64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22

# Result codes of POT's network simplex (ot.lp.emd_wrap.check_result).
_EMD_OPTIMAL = 1
_EMD_MAX_ITER_REACHED = 3


class OTConvergenceError(RuntimeError):
    """The exact OT solver stopped before reaching optimality."""


def _as_points(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array / torch tensor / nested list to a float64 numpy array [N, D]."""
    if hasattr(x, "detach"):  # torch tensor (any dtype/device), without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return np.ascontiguousarray(arr)


def _as_pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = _as_points(x, "x"), _as_points(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(
            f"x and y must have the same dimension, got {xa.shape[1]} and {ya.shape[1]}"
        )
    return xa, ya


def sliced_w2(x: Any, y: Any, n_projections: int = 100, seed: int | None = 0) -> float:
    """Sliced Wasserstein-2 between point clouds ``x`` [N, D] and ``y`` [M, D], as POT defines it.

    ``sqrt(mean_theta W2^2(theta.x, theta.y))`` over ``n_projections`` random unit directions from
    ``ot.sliced.get_random_projections(D, n_projections, seed)``; equals
    ``ot.sliced_wasserstein_distance(x, y, n_projections=n_projections, p=2, seed=seed)``.
    ``seed=None`` draws fresh directions. Equal sizes use a sort-based computation (mean squared
    difference of the sorted projections); unequal sizes integrate the difference of the two
    quantile functions over their merged breakpoints (as POT's ``wasserstein_1d`` does, tested
    against it). Projections are processed in chunks so memory stays bounded.
    """
    xa, ya = _as_pair(x, y)
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    n, m = xa.shape[0], ya.shape[0]
    d = xa.shape[1]
    projections = ot.sliced.get_random_projections(d, n_projections, seed)  # [D, P], unit columns
    chunk = max(1, _CHUNK_ELEMENTS // max(n, m))

    if n != m:
        # 1-D W2^2 between uniform empirical measures = integral over q in (0, 1] of the squared
        # difference of their quantile functions, piecewise constant between the merged
        # breakpoints {i/n} and {j/m}; each piece is evaluated at its midpoint.
        q = np.sort(np.concatenate([np.arange(1, n + 1) / n, np.arange(1, m + 1) / m]))
        width = np.diff(q, prepend=0.0)
        mid = q - width / 2
        ix = np.minimum((mid * n).astype(np.int64), n - 1)
        iy = np.minimum((mid * m).astype(np.int64), m - 1)
        chunk = max(1, _CHUNK_ELEMENTS // (n + m))

    total = 0.0  # sum over projections of W2^2 between the 1-D projections
    for start in range(0, n_projections, chunk):
        proj = projections[:, start : start + chunk]
        xp = np.sort(xa @ proj, axis=0)
        yp = np.sort(ya @ proj, axis=0)
        if n == m:
            total += float(np.sum((xp - yp) ** 2)) / n
        else:
            total += float(width @ ((xp[ix] - yp[iy]) ** 2).sum(axis=1))
    return math.sqrt(max(total / n_projections, 0.0))


def exact_w2(x: Any, y: Any, num_itermax: int = 100_000_000) -> float:
    """Exact Wasserstein-2 between uniform point clouds ``x`` [N, D] and ``y`` [M, D].

    ``sqrt(ot.emd2(unif(N), unif(M), ot.dist(x, y)))`` (squared-Euclidean cost). Raises
    :class:`OTConvergenceError` if the network simplex stops before optimality (e.g. after
    ``num_itermax`` iterations). Memory is O(N * M): 10K x 10K needs ~1.6 GB (cost + plan).
    """
    xa, ya = _as_pair(x, y)
    a = ot.unif(xa.shape[0])
    b = ot.unif(ya.shape[0])
    cost = ot.dist(xa, ya)  # squared Euclidean
    with warnings.catch_warnings():
        # POT warns "numItermax reached before optimality" (twice with log=True); we raise instead.
        warnings.simplefilter("ignore", UserWarning)
        w2_sq, log = ot.emd2(a, b, cost, numItermax=int(num_itermax), log=True)
    code = int(log["result_code"])
    if code == _EMD_MAX_ITER_REACHED:
        raise OTConvergenceError(
            f"exact_w2: network simplex hit num_itermax={num_itermax} before optimality "
            f"({xa.shape[0]} vs {ya.shape[0]} points); raise num_itermax or use fewer points"
        )
    if code != _EMD_OPTIMAL:
        raise OTConvergenceError(
            f"exact_w2: network simplex failed (result_code={code}: {log.get('warning')}) "
            f"with num_itermax={num_itermax}; check the inputs for NaN/inf or use fewer points"
        )
    return math.sqrt(max(float(w2_sq), 0.0))


def mean_sd(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values``; sd is 0.0 for a single value."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray([float(v) for v in np.ravel(np.asarray(values, dtype=object))])
    if arr.size == 0:
        raise ValueError("mean_sd needs at least one value")
    mean = float(arr.mean())
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return mean, sd

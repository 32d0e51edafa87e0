"""Tests for diffft.metrics.ot (sliced / exact Wasserstein-2 on point clouds)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

import diffft.metrics.ot as dot
from diffft.metrics.ot import OTConvergenceError, exact_w2, mean_sd, sliced_w2


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- sliced_w2


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("n,m", [(300, 300), (300, 217)])
@pytest.mark.parametrize("seed", [0, 7])
def test_sliced_w2_matches_pot(n: int, m: int, d: int, seed: int) -> None:
    rng = _rng(100 * d + n + m)
    x = rng.normal(size=(n, d))
    y = rng.normal(loc=0.5, scale=1.3, size=(m, d))
    ref = ot.sliced_wasserstein_distance(x, y, n_projections=50, p=2, seed=seed)
    assert sliced_w2(x, y, n_projections=50, seed=seed) == pytest.approx(ref, rel=0, abs=1e-10)
    # Different seed -> different directions -> (slightly) different value.
    assert sliced_w2(x, y, n_projections=50, seed=seed + 1) != pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("n,m", [(120, 120), (120, 95)])
def test_sliced_w2_chunked_matches_pot(monkeypatch: pytest.MonkeyPatch, n: int, m: int) -> None:
    """Force several (uneven) projection chunks: 120 * 7 elements -> 7 projections per chunk."""
    rng = _rng(3)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3)) + 0.3
    ref = ot.sliced_wasserstein_distance(x, y, n_projections=45, p=2, seed=11)
    monkeypatch.setattr(dot, "_CHUNK_ELEMENTS", 120 * 7)
    assert sliced_w2(x, y, n_projections=45, seed=11) == pytest.approx(ref, rel=0, abs=1e-10)


def test_sliced_w2_does_not_call_pot_and_matches_it_for_any_sizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both paths (equal sizes: sorted differences; unequal: merged quantile breakpoints) are
    computed here, not by POT's slow per-projection quantile search, and equal POT's values,
    including sizes that share breakpoints (6 vs 3), a single point, and 300 vs 10K."""
    rng = _rng(4)
    pairs = [(64, 64), (64, 50), (6, 3), (1, 5), (300, 10_000)]
    clouds = [(rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) * 1.2 + 0.1) for n, m in pairs]
    refs = [ot.sliced_wasserstein_distance(x, y, n_projections=20, p=2, seed=0) for x, y in clouds]

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("POT used")

    monkeypatch.setattr(ot, "sliced_wasserstein_distance", boom)
    monkeypatch.setattr(ot.lp, "wasserstein_1d", boom)
    for (x, y), ref in zip(clouds, refs, strict=True):
        assert sliced_w2(x, y, n_projections=20) == pytest.approx(ref, rel=0, abs=1e-10)
        assert sliced_w2(y, x, n_projections=20) == pytest.approx(ref, rel=0, abs=1e-10)


def test_sliced_w2_accepts_torch() -> None:
    rng = _rng(5)
    x = rng.normal(size=(100, 2)).astype(np.float32)
    y = rng.normal(size=(100, 2)).astype(np.float32) + 1.0
    expected = sliced_w2(x.astype(np.float64), y.astype(np.float64))
    assert sliced_w2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-12)
    assert sliced_w2(torch.from_numpy(x), y) == pytest.approx(expected, abs=1e-12)


def test_sliced_w2_self_is_zero() -> None:
    x = _rng(6).normal(size=(500, 3))
    assert sliced_w2(x, x, n_projections=200) == 0.0
    assert sliced_w2(x, x[::-1].copy(), n_projections=200) == 0.0  # order does not matter


@pytest.mark.parametrize("d", [2, 3])
def test_sliced_w2_translation(d: int) -> None:
    """y = x + c: every 1-D projection is a pure shift by theta.c, so sliced W2^2 is
    mean_theta (theta.c)^2 exactly, which tends to E[(theta.c)^2] = |c|^2 / d."""
    rng = _rng(10 + d)
    n, n_proj = 2000, 2000
    x = rng.normal(size=(n, d))
    c = np.zeros(d)
    c[0], c[-1] = 0.6, -0.8  # |c| = 1
    y = x + c
    value = sliced_w2(x, y, n_projections=n_proj, seed=1)

    # Exact identity with the seeded directions.
    theta = ot.sliced.get_random_projections(d, n_proj, 1)
    assert value**2 == pytest.approx(np.mean((c @ theta) ** 2), rel=1e-10)

    # Closed form for uniform directions. (theta.c)^2 / |c|^2 has sd <= 0.36 around its mean 1/d,
    # so at 2000 directions the sliced W2^2 is within ~2% (1 sd), W2 within ~1%; allow 4%.
    closed = math.sqrt(1.0 / d)
    assert value == pytest.approx(closed, rel=0.04)

    # Far above the floor: two independent samples of the same distribution.
    floor = sliced_w2(x, rng.normal(size=(n, d)), n_projections=n_proj, seed=1)
    assert floor < 0.1
    assert value > 5 * floor


def test_sliced_w2_validates_inputs() -> None:
    with pytest.raises(ValueError):
        sliced_w2(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        sliced_w2(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError):
        sliced_w2(np.zeros((5, 2)), np.zeros((5, 2)), n_projections=0)


# --------------------------------------------------------------------------- exact_w2


def _gaussian_sample_exact_moments(
    rng: np.random.Generator, n: int, mean: np.ndarray, var: np.ndarray
) -> np.ndarray:
    """n points whose empirical mean and (ddof=0) covariance are exactly mean and diag(var)."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    chol = np.linalg.cholesky(z.T @ z / n)
    z = np.linalg.solve(chol, z.T).T  # now exactly white
    return mean + z * np.sqrt(var)


def test_exact_w2_gaussians_closed_form() -> None:
    """Gaussian closed form W2^2 = |m1-m2|^2 + ||S1^1/2 - S2^1/2||_F^2 (diagonal covariances).

    Tolerance: the samples are whitened so their empirical mean/covariance equal the population
    ones exactly. By the Gelbrich bound, W2 between *any* two distributions is >= the Gaussian
    closed form of their means/covariances, so the empirical exact W2 must be >= the closed form
    (up to round-off). The excess is the non-Gaussianity of 1500-point clouds: about the W2^2
    between two independent 2-D samples of that size: measured 0.012-0.020 over seeds 20-25
    against a closed form of 9.92, so allow W2^2 to exceed it by at most 0.1 (~0.5% in W2).
    Returning W2^2, W1 (W1^2 ~ 9.74 here), or dropping the covariance term (0.92) all fail.
    """
    rng = _rng(20)
    n = 1500
    m1, v1 = np.array([0.0, 0.0]), np.array([1.0, 0.25])
    m2, v2 = np.array([3.0, 0.0]), np.array([0.5, 2.0])
    x = _gaussian_sample_exact_moments(rng, n, m1, v1)
    y = _gaussian_sample_exact_moments(rng, n, m2, v2)
    closed_sq = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)

    value = exact_w2(x, y)
    assert value**2 >= closed_sq - 1e-9
    assert value**2 <= closed_sq + 0.1


def test_exact_w2_matches_pot_and_small_cases() -> None:
    rng = _rng(21)
    x, y = rng.normal(size=(80, 3)), rng.normal(size=(60, 3)) + 1.0
    ref = ot.emd2(ot.unif(80), ot.unif(60), ot.dist(x, y), numItermax=1_000_000)
    assert exact_w2(x, y) == pytest.approx(math.sqrt(ref), rel=1e-12)
    # Hand-computed: {0, 2} vs {1} on the line -> every unit of mass moves 1.
    assert exact_w2(np.array([[0.0], [2.0]]), np.array([[1.0]])) == pytest.approx(1.0, abs=1e-12)
    # Torch inputs give the same value.
    assert exact_w2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        math.sqrt(ref), rel=1e-12
    )


def test_exact_w2_identical_sets_is_zero() -> None:
    rng = _rng(22)
    x = rng.normal(size=(400, 2))
    assert exact_w2(x, x) == 0.0
    # A permuted copy: the optimal plan is a permutation, not the identity.
    assert exact_w2(x, x[rng.permutation(400)]) < 1e-6
    # Unequal sizes, same empirical measure.
    assert exact_w2(x, np.concatenate([x, x])) < 1e-6


def test_exact_w2_raises_when_not_converged() -> None:
    rng = _rng(23)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # POT's own warning must not leak out instead
        with pytest.raises(OTConvergenceError, match=r"num_itermax=10\b.*raise num_itermax"):
            exact_w2(x, y, num_itermax=10)
    assert issubclass(OTConvergenceError, RuntimeError)


# --------------------------------------------------------------------------- mean_sd


def test_mean_sd() -> None:
    mean, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert sd == pytest.approx(math.sqrt(5.0 / 3.0))  # ddof=1: sum sq dev 5 over 3
    assert mean_sd([5.0]) == (5.0, 0.0)
    assert mean_sd(np.array([2.0, 4.0])) == pytest.approx((3.0, math.sqrt(2.0)))
    assert mean_sd(torch.tensor([2.0, 4.0])) == pytest.approx((3.0, math.sqrt(2.0)))
    assert mean_sd([torch.tensor(1.0), torch.tensor(3.0)]) == pytest.approx((2.0, math.sqrt(2.0)))
    with pytest.raises(ValueError):
        mean_sd([])

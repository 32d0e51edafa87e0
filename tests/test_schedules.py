"""Tests for diffft.diffusion.schedules: full beta schedules and chain sub-sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffft.diffusion.schedules import (
    SCHEDULES,
    SUBSAMPLE_KINDS,
    StepSchedule,
    alpha_bar,
    beta_schedule,
    subsample,
)


@pytest.fixture(scope="module")
def linear_betas() -> torch.Tensor:
    return beta_schedule("linear", 1000, 1e-4, 0.02)


# -- full schedules ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_are_float64_of_the_right_length_and_valid(name: str) -> None:
    betas = beta_schedule(name, 257)
    assert betas.dtype == torch.float64 and betas.shape == (257,)
    assert bool(((betas > 0) & (betas < 1)).all())


def test_linear_endpoints_and_final_alpha_bar(linear_betas: torch.Tensor) -> None:
    assert linear_betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert linear_betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert alpha_bar(linear_betas)[-1].item() == pytest.approx(4.04e-5, rel=2e-3)


def test_quadratic_is_linear_in_sqrt_beta() -> None:
    betas = beta_schedule("quadratic", 3, 1e-4, 0.04)
    expected = torch.tensor([1e-4, ((0.01 + 0.2) / 2) ** 2, 0.04], dtype=torch.float64)
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("T", "expected", "half_digit"),
    [(5, 0.975, 5e-4), (10, 0.951, 5e-4), (100, 0.605, 5e-4), (1000, 0.0066, 5e-5)],
)
def test_sigmoid_final_alpha_bar_matches_sft_pg_toy_values(
    T: int, expected: float, half_digit: float
) -> None:
    betas = beta_schedule("sigmoid", T, 1e-5, 1e-2)
    assert alpha_bar(betas)[-1].item() == pytest.approx(expected, abs=half_digit)


def test_cosine_starts_near_one_ends_near_zero_and_is_clipped() -> None:
    betas = beta_schedule("cosine", 1000, beta_start=0.5, beta_end=0.6)  # ends are ignored
    ab = alpha_bar(betas)
    assert ab[0].item() > 0.9999
    assert ab[-1].item() < 1e-4
    assert betas.max().item() == pytest.approx(0.999)
    # away from the clipped last step alpha_bar follows the closed form
    t = 500 / 1000
    closed = (
        math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    )
    assert ab[499].item() == pytest.approx(closed, rel=1e-10)


def test_unknown_schedule_is_named_and_choices_listed() -> None:
    with pytest.raises(ValueError, match="'bogus'") as info:
        beta_schedule("bogus", 10)
    assert all(name in str(info.value) for name in SCHEDULES)


def test_alpha_bar_is_float64_cumprod() -> None:
    betas = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float32)
    ab = alpha_bar(betas)
    assert ab.dtype == torch.float64 and ab.shape == (3,)
    torch.testing.assert_close(
        ab, torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64), rtol=1e-7, atol=0
    )


# -- StepSchedule ------------------------------------------------------------------------------
def test_step_schedule_betas_and_steps() -> None:
    s = StepSchedule(
        alpha_bar=torch.tensor([1.0, 0.8, 0.4], dtype=torch.float64),
        net_t=torch.tensor([-1.0, 3.0, 7.0], dtype=torch.float64),
    )
    assert s.steps == 2
    torch.testing.assert_close(s.betas, torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64))


def test_step_schedule_rejects_non_decreasing_alpha_bar() -> None:
    with pytest.raises(ValueError, match="decrease strictly"):
        StepSchedule(
            alpha_bar=torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64),
            net_t=torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64),
        )


# -- subsample: none / uniform / quadratic / fastdpm_step --------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_none_round_trips_the_full_schedule(name: str) -> None:
    betas = beta_schedule(name, 1000)
    s = subsample(betas, 1000, "none")
    assert s.steps == 1000
    assert s.alpha_bar.dtype == torch.float64 and s.net_t.dtype == torch.float64
    assert s.alpha_bar[0].item() == 1.0 and s.net_t[0].item() == -1.0
    torch.testing.assert_close(s.betas[1:], betas, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.net_t[1:], torch.arange(1000, dtype=torch.float64))


def test_none_with_other_length_says_so(linear_betas: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="steps=10") as info:
        subsample(linear_betas, 10, "none")
    assert "uniform" in str(info.value)


def test_uniform_spans_both_ends_and_rounds(linear_betas: torch.Tensor) -> None:
    s = subsample(linear_betas, 10, "uniform")
    assert s.net_t[1].item() == 0 and s.net_t[-1].item() == 999
    ab_full = alpha_bar(linear_betas)
    torch.testing.assert_close(s.alpha_bar[1:], ab_full[s.net_t[1:].long()], rtol=0, atol=0)
    # round, not floor: linspace(0, 99, 8) = 0, 14.14, 28.29, 42.43, 56.57, ...
    t = subsample(beta_schedule("linear", 100), 8, "uniform").net_t[1:]
    assert t.tolist() == [0, 14, 28, 42, 57, 71, 85, 99]


def test_uniform_with_more_steps_than_t_fails(linear_betas: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="steps <= T"):
        subsample(linear_betas, 1001, "uniform")


def test_quadratic_matches_ddim(linear_betas: torch.Tensor) -> None:
    s = subsample(linear_betas, 10, "quadratic")
    assert s.net_t[1:].tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    # FastDPM's quadratic STEP is the same rule
    torch.testing.assert_close(
        subsample(linear_betas, 10, "fastdpm_step", "quadratic").net_t, s.net_t
    )


@pytest.mark.parametrize(("T", "steps"), [(10, 10), (1000, 50)])
def test_quadratic_with_repeated_times_fails_clearly(T: int, steps: int) -> None:
    with pytest.raises(ValueError, match="not strictly increasing"):
        subsample(beta_schedule("linear", T), steps, "quadratic")


def test_fastdpm_step_linear_follows_get_step_step(linear_betas: torch.Tensor) -> None:
    s = subsample(linear_betas, 10, "fastdpm_step", "linear")
    assert s.net_t[1:].tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # FastDPM computes floor(i * c) with a float c: at T=16, S=12 that ends at 14, not 15
    t = subsample(beta_schedule("linear", 16), 12, "fastdpm_step", "linear").net_t[1:]
    assert t.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]


def test_unknown_kind_and_spacing_are_named(linear_betas: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="'ddpm'") as info:
        subsample(linear_betas, 10, "ddpm")
    assert all(kind in str(info.value) for kind in SUBSAMPLE_KINDS)
    with pytest.raises(ValueError, match="'cubic'.*'linear', 'quadratic'"):
        subsample(linear_betas, 10, "fastdpm_step", spacing="cubic")


@pytest.mark.parametrize(
    "betas", [torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0.1, 1.2])]
)
def test_bad_betas_fail(betas: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="beta"):
        subsample(betas, 2, "uniform")


# -- subsample: fastdpm_var --------------------------------------------------------------------
def _assert_net_t_tracks_alpha_bar(s: StepSchedule, betas: torch.Tensor) -> None:
    """net_t[k] must be where the full model's log alpha_bar (log-linear between integer
    times) equals log alpha_bar[k]; a float32 bisection misses this by up to a whole step."""
    log_ab_full = alpha_bar(betas).log().numpy()
    t_interp = np.interp(-s.alpha_bar[1:].log().numpy(), -log_ab_full, np.arange(len(betas)))
    np.testing.assert_allclose(s.net_t[1:].numpy(), t_interp, rtol=0, atol=0.05)


def test_fastdpm_var_quadratic_is_capped_by_its_domain(linear_betas: torch.Tensor) -> None:
    s = subsample(linear_betas, 10, "fastdpm_var", "quadratic")
    assert s.steps == 10
    assert s.alpha_bar[-1].item() == pytest.approx(0.0208, rel=2e-3)
    assert s.net_t[-1].item() == pytest.approx(617, abs=1)
    assert s.net_t[1].item() == pytest.approx(0, abs=0.1)  # FastDPM asserts |tau| < 0.1
    assert bool((s.net_t[1:].diff() > 0).all())
    assert bool((s.alpha_bar.diff() < 0).all())
    assert (s.net_t[2:] != s.net_t[2:].round()).any()  # continuous times
    # eta_i = beta_0 (1 + i x)^2 with x at the top of (0, 0.95 / sqrt(beta_0) / S)
    x = 0.95 / math.sqrt(1e-4) / 10
    eta = 1e-4 * (1 + torch.arange(10, dtype=torch.float64) * x) ** 2
    torch.testing.assert_close(s.betas[1:], eta, rtol=1e-9, atol=1e-12)
    _assert_net_t_tracks_alpha_bar(s, linear_betas)


@pytest.mark.parametrize("steps", [10, 50])
def test_fastdpm_var_linear_reaches_the_model_noise_level(
    linear_betas: torch.Tensor, steps: int
) -> None:
    s = subsample(linear_betas, steps, "fastdpm_var", "linear")
    ab_end = alpha_bar(linear_betas)[-1].item()
    assert ab_end <= s.alpha_bar[-1].item() <= ab_end * (1 + 1e-4)  # bisearch eps=1e-4
    assert 998 < s.net_t[-1].item() <= 999
    assert bool((s.net_t[1:].diff() > 0).all())
    torch.testing.assert_close(  # eta = linspace(beta_0, x, S)
        s.betas[1:].diff().diff(),
        torch.zeros(steps - 2, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    _assert_net_t_tracks_alpha_bar(s, linear_betas)


def test_fastdpm_var_rejects_a_non_linear_model_schedule() -> None:
    with pytest.raises(ValueError, match="linear"):
        subsample(beta_schedule("cosine", 1000), 10, "fastdpm_var")

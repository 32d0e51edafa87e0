"""The training diagnostics' maths (diffft.methods.diagnostics)."""

import math

import pytest
import torch

from diffft.methods.diagnostics import (
    grad_norm,
    sample_diagnostics,
    sigma_logs,
    split_gradient_cosine,
)


def _loss_of(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """A mean squared error over the items of a slice, with a dropout that draws from torch's
    global random state (as a network with dropout would)."""

    def loss_of(b: slice) -> torch.Tensor:
        noise = torch.nn.functional.dropout(torch.ones(x[b].shape[0]), 0.5)
        return ((x[b] @ w - y[b]) ** 2 * noise).mean()

    return loss_of


def test_split_gradient_cosine_is_1_for_equal_halves_and_minus_1_for_opposite_ones():
    torch.manual_seed(0)
    w = torch.zeros(3, requires_grad=True)
    x = torch.randn(4, 3)
    same = torch.cat([x, x])  # the second half repeats the first: the same gradient
    y = torch.ones(8)
    loss_of = lambda b: ((same[b] @ w - y[b]) ** 2).mean()  # noqa: E731
    assert split_gradient_cosine(loss_of, 8, [w]).item() == pytest.approx(1.0, abs=1e-5)
    # d/dw (x.w - y)^2 at w = 0 is -2 y x: flipping y flips the second half's gradient
    y_flip = torch.cat([torch.ones(4), -torch.ones(4)])
    flipped = lambda b: ((same[b] @ w - y_flip[b]) ** 2).mean()  # noqa: E731
    assert split_gradient_cosine(flipped, 8, [w]).item() == pytest.approx(-1.0, abs=1e-5)
    assert math.isnan(split_gradient_cosine(loss_of, 1, [w]).item())  # one item: no two halves


def test_split_gradient_cosine_chunked_equals_whole_and_leaves_the_random_state():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x, y = torch.randn(10, 3), torch.randn(10)
    loss_of = _loss_of(w, x, y)
    torch.manual_seed(5)
    whole = split_gradient_cosine(loss_of, 10, [w])
    after_whole = torch.rand(3)
    torch.manual_seed(5)
    chunked = split_gradient_cosine(loss_of, 10, [w], chunk=2)
    torch.manual_seed(5)
    untouched = torch.rand(3)
    assert torch.equal(after_whole, untouched)  # the diagnostic drew nothing of the run's
    # the same dropout masks in both (forked from the same state); only the summation differs
    torch.testing.assert_close(chunked, whole)
    assert w.grad is None  # nothing accumulated into the parameters


def test_grad_norm_sample_diagnostics_and_sigma_logs():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert grad_norm([a, b]).item() == pytest.approx(5.0, abs=1e-5)
    real, fake = torch.randn(500, 1, 4, 4), 2 * torch.randn(500, 1, 4, 4)
    logs = sample_diagnostics(real, fake, torch.tensor([0.0, 2.0]))
    assert 3.0 < logs["diag/sample_var_ratio"].item() < 5.0  # (2 sd)^2 / sd^2 = 4
    assert logs["diag/f_fake_sd"].item() == pytest.approx(math.sqrt(2.0), abs=1e-5)
    sig = sigma_logs(torch.tensor([0.0, math.log(1e-3), math.log(0.5)]))
    assert set(sig) == {"sigma/k1", "sigma/k2"}
    assert sig["sigma/k2"].item() == pytest.approx(0.5, abs=1e-5)

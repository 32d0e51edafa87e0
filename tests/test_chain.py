import math

import pytest
import torch
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.nets.mlp import TimeMLP


class GaussianEps(nn.Module):
    """The exact eps-predictor for data ~ N(0, s^2 I): eps = sqrt(1-ab) x / (ab s^2 + 1 - ab)."""

    def __init__(self, ab_full: torch.Tensor, s: float) -> None:
        super().__init__()
        self.register_buffer("ab", ab_full.float())
        self.s = s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.ab[t].view(-1, 1)
        return (1 - ab).sqrt() * x / (ab * self.s**2 + 1 - ab)


def test_ddpm_coefficients_match_the_sft_pg_code():
    betas = beta_schedule("sigmoid", 10, 1e-5, 1e-2)
    chain = GaussianChain(nn.Identity(), subsample(betas, 10), (2,))
    alphas, ab = 1 - betas, alpha_bar(betas)
    torch.testing.assert_close(chain.c_x[1:], (1 / alphas.sqrt()).float())
    torch.testing.assert_close(
        chain.c_eps[1:], (-(1 - alphas) / (alphas.sqrt() * (1 - ab).sqrt())).float()
    )
    torch.testing.assert_close(chain.fixed_sigma[1:], betas.sqrt().float())


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_log_prob_matches_torch_distributions(learn_sigma):
    torch.manual_seed(0)
    betas = beta_schedule("linear", 50)
    net = TimeMLP(3, 50, width=16, depth=2)
    chain = GaussianChain(net, subsample(betas, 5, "uniform"), (3,), learn_sigma=learn_sigma)
    if learn_sigma:
        with torch.no_grad():
            chain.log_sigma.add_(torch.linspace(-0.5, 0.5, 6))
    k = torch.randint(1, 6, (64,))
    x_k, x_prev = torch.randn(64, 3), torch.randn(64, 3)
    expected = (
        torch.distributions.Normal(chain.mean(x_k, k), chain.sigma(k)).log_prob(x_prev).sum(-1)
    )
    got = chain.log_prob(x_prev, x_k, k)
    assert got.shape == (64,)
    torch.testing.assert_close(got, expected)


def test_learned_sigma_gets_gradient_and_changes_log_prob():
    betas = beta_schedule("linear", 20)
    chain = GaussianChain(TimeMLP(2, 20, width=8), subsample(betas, 20), (2,), learn_sigma=True)
    k = torch.full((8,), 3)
    lp = chain.log_prob(torch.randn(8, 2), torch.randn(8, 2), k).sum()
    lp.backward()
    assert chain.log_sigma.grad[3] != 0 and chain.log_sigma.grad[5] == 0


@pytest.mark.parametrize(
    "parameterisation,variance", [("ddpm", "posterior"), ("ddpm", "beta"), ("ddim", "beta")]
)
def test_full_chain_with_exact_eps_recovers_gaussian_data(parameterisation, variance):
    s = 0.5
    betas = beta_schedule("linear", 1000)
    chain = GaussianChain(
        GaussianEps(alpha_bar(betas), s),
        subsample(betas, 1000),
        (2,),
        parameterisation=parameterisation,
        variance=variance,
        eta=1.0,
    )
    x = chain.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert x.std().item() == pytest.approx(s, rel=0.03)
    assert x.mean().abs().item() < 0.02


def test_trajectory_and_grad_modes():
    betas = beta_schedule("sigmoid", 10, 1e-5, 1e-2)
    chain = GaussianChain(TimeMLP(2, 10, width=8), subsample(betas, 10), (2,))
    g = torch.Generator().manual_seed(1)
    traj = chain.sample(16, generator=g, return_trajectory=True)
    assert traj.states.shape == (11, 16, 2) and traj.steps == 10
    assert not traj.states.requires_grad
    x_k, x_prev, k = traj.transitions()
    assert x_k.shape == (160, 2) and k.min() == 1 and k.max() == 10
    # transition (x_k -> x_{k-1}) in the flat view is the right pair of states
    torch.testing.assert_close(x_k[k == 10], traj.states[10])
    torch.testing.assert_close(x_prev[k == 10], traj.states[9])
    assert torch.isfinite(chain.log_prob(x_prev, x_k, k)).all()
    # same seed -> same samples; grad=True keeps the graph
    a = chain.sample(16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, traj.sample)
    b = chain.sample(16, generator=torch.Generator().manual_seed(1), grad=True)
    assert b.requires_grad
    b.sum().backward()
    assert chain.eps_net.head.weight.grad is not None


def test_subsampled_chain_uses_the_model_times():
    betas = beta_schedule("linear", 1000)
    chain = GaussianChain(nn.Identity(), subsample(betas, 10, "uniform"), (2,))
    assert chain.net_t[1].item() == 0 and chain.net_t[10].item() == 999
    assert chain.steps == 10
    assert math.isclose(chain.alpha_bar[10].item(), alpha_bar(betas)[-1].item(), rel_tol=1e-5)


def test_zero_sigma_steps_sample_but_have_no_density():
    betas = beta_schedule("linear", 50)
    net = TimeMLP(2, 50, width=8, depth=1)
    ddim = GaussianChain(net, subsample(betas, 5, "uniform"), (2,), parameterisation="ddim", eta=0)
    assert ddim.zero_sigma_steps == (1, 2, 3, 4, 5)
    x = ddim.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    k = torch.ones(4, dtype=torch.long)
    with pytest.raises(ValueError, match="sigma_k = 0 at k=\\[1, 2, 3, 4, 5\\].*sampler.sigma_min"):
        ddim.log_prob(x, x, k)
    sched = subsample(betas, 5, "uniform")
    with pytest.raises(ValueError, match="sampler.learn_sigma=true needs sigma_k > 0.*k=\\[1\\]"):
        GaussianChain(net, sched, (2,), variance="posterior", learn_sigma=True)
    floored = GaussianChain(net, sched, (2,), variance="posterior", sigma_min=1e-4)
    assert floored.zero_sigma_steps == () and torch.isfinite(floored.log_prob(x, x, k)).all()


def test_evaluation_samples_in_eval_mode_and_restores_the_mode():
    from diffft.data.toy import ToyDataModule
    from diffft.evaluation import Evaluator

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("anchor", torch.zeros(()))
            self.modes: list[bool] = []
            self.device = torch.device("cpu")

        def sample(self, n, generator=None, batch_size=None):
            self.modes.append(self.training)
            return torch.randn(n, 2, generator=generator)

    dm = ToyDataModule("swiss_roll", n_train=200, n_test=200)
    dm.setup()
    chain = Recorder().train()
    Evaluator(dm, ["sw"], n=100, draws=2).evaluate(chain)
    assert chain.modes == [False, False] and chain.training


def test_log_prob_of_the_rollout_noise_equals_log_prob():
    torch.manual_seed(0)
    net = TimeMLP(event_shape=[2], n_steps=10, width=16, depth=1)
    chain = GaussianChain(net, subsample(beta_schedule("linear", 10), 10), (2,), learn_sigma=True)
    traj = chain.sample(50, return_trajectory=True, return_noise=True)
    x_k, x_prev, k = traj.transitions()
    with torch.no_grad():
        expected = chain.log_prob(x_prev, x_k, k)
        got = chain.log_prob_of_noise(traj.transition_noise(), k)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [4, 10])
def test_released_image_chain_matches_fastdpm_var_sampling(steps):
    """The released SFT-PG / DxMI image chain: FastDPM VAR with quadratic spacing, the posterior
    variance (beta tilde) and sigma_1 = 0.001, against FastDPM's ``VAR_sampling`` written out
    with numpy from the short beta sequence eta: x <- (x - eta_n / sqrt(1 - ab_n) eps) /
    sqrt(1 - eta_n) + sqrt(eta_n (1 - ab_{n-1}) / (1 - ab_n)) z."""
    betas = beta_schedule("linear", 1000, 1e-4, 2e-2)
    b0 = 1e-4
    # FastDPM get_VAR_noise(quadratic): eta_i = b0 (1 + i x)^2 with prod(1 - eta) = prod(1 - betas)
    target = float(torch.prod(1 - betas))
    lo, hi = 0.0, 0.95 / math.sqrt(b0) / steps
    for _ in range(200):
        x = (lo + hi) / 2
        eta = [b0 * (1 + i * x) ** 2 for i in range(steps)]
        if math.prod(1 - e for e in eta) > target:
            lo = x
        else:
            hi = x
    ab = [math.prod(1 - e for e in eta[: i + 1]) for i in range(steps)]
    sched = subsample(betas, steps, "fastdpm_var", "quadratic")
    chain = GaussianChain(
        nn.Identity(), sched, (2,), variance="posterior", sigma_last=1e-3, continuous_time=True
    )
    for k in range(1, steps + 1):
        e, a = eta[k - 1], ab[k - 1]
        assert chain.c_x[k].item() == pytest.approx(1 / math.sqrt(1 - e), rel=1e-4)
        assert chain.c_eps[k].item() == pytest.approx(
            -e / (math.sqrt(1 - a) * math.sqrt(1 - e)), rel=1e-4
        )
        expected = 1e-3 if k == 1 else math.sqrt(e * (1 - ab[k - 2]) / (1 - a))
        assert chain.fixed_sigma[k].item() == pytest.approx(expected, rel=1e-4)
    # the first step from noise amplifies eps errors far less than with linear spacing
    linear = GaussianChain(nn.Identity(), subsample(betas, steps, "fastdpm_var"), (2,))
    assert chain.c_x[steps] < 0.5 * linear.c_x[steps]
    assert chain.zero_sigma_steps == ()  # the chain has a density (SFT-PG's log-probabilities)


def test_sigma_last_must_be_positive():
    with pytest.raises(ValueError, match="sampler.sigma_last"):
        GaussianChain(nn.Identity(), subsample(beta_schedule("linear", 10), 10), (2,), sigma_last=0)


def test_sigma_last_holds_a_learned_sigma_1_fixed():
    betas = beta_schedule("linear", 20)
    chain = GaussianChain(
        TimeMLP(2, 20, width=8), subsample(betas, 5, "uniform"), (2,), variance="posterior",
        learn_sigma=True, sigma_last=1e-3,
    )  # fmt: skip
    k = torch.tensor([1, 1, 3, 5])
    chain.log_prob(torch.randn(4, 2), torch.randn(4, 2), k).sum().backward()
    assert chain.log_sigma.grad[1] == 0 and chain.log_sigma.grad[3] != 0
    with torch.no_grad():
        chain.log_sigma.add_(1.0)
    sig = chain.sigma(k).flatten()
    assert sig[0].item() == pytest.approx(1e-3)
    assert sig[2].item() == pytest.approx(chain.fixed_sigma[3].item() * math.e, rel=1e-5)

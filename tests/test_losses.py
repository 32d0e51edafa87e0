import pytest
import torch
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.schedules import beta_schedule, subsample
from diffft.methods.losses import (
    baseline_loss,
    gradient_penalty,
    ipm_critic_loss,
    policy_gradient_loss,
)
from diffft.nets.mlp import MLP


class LinearEps(nn.Module):
    """eps(x, t) = A x + b_t: a tiny linear-Gaussian chain with a closed-form-friendly graph."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.4]]))
        self.b = nn.Parameter(torch.tensor([[0.5, -0.3]]).repeat(steps, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T + self.b[t]


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_policy_gradient_matches_pathwise_gradient_in_expectation():
    """SFT-PG Thm 4.1: E[f(x_0) grad sum_k log p(x_{k-1}|x_k)] = grad E[f(x_0)].

    Would fail with a wrong sign, a mean instead of a sum over dimensions, or a log-prob
    that ignores part of the transition."""
    torch.manual_seed(0)
    steps, n = 3, 400_000
    chain = GaussianChain(
        LinearEps(steps), subsample(beta_schedule("linear", steps, 0.1, 0.3), steps), (2,)
    )
    params = list(chain.parameters())
    target = torch.tensor([1.0, -0.5])

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x - target).square().sum(-1)

    g = torch.Generator().manual_seed(1)
    pathwise = _grads(f(chain.sample(n, generator=g, grad=True)).mean(), params)

    traj = chain.sample(n, generator=g, return_trajectory=True)
    x_k, x_prev, k = traj.transitions()
    returns = f(traj.sample)
    advantage = (returns - returns.mean()).repeat(steps)  # a constant baseline keeps it unbiased
    # policy_gradient_loss averages over the K*n transitions; E f grad sum_k = K * that mean.
    pg = steps * _grads(policy_gradient_loss(chain.log_prob(x_prev, x_k, k), advantage), params)
    assert pathwise.norm() > 0.5
    torch.testing.assert_close(pg, pathwise, atol=0.05 * pathwise.norm().item(), rtol=0)


def test_critic_loss_sign_separates_real_from_fake():
    torch.manual_seed(0)
    critic = MLP(2, width=32)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    real, fake = torch.randn(256, 2), torch.randn(256, 2) + 3.0
    for _ in range(30):
        opt.zero_grad()
        ipm_critic_loss(critic(real), critic(fake)).backward()
        opt.step()
    with torch.no_grad():
        assert critic(fake).mean() > critic(real).mean() + 1.0  # f is a cost: high on samples


def test_gradient_penalty_zero_for_unit_slope_and_positive_otherwise():
    real, fake = torch.randn(64, 2), torch.randn(64, 2)
    unit = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([[0.6, 0.8]]))
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        unit.weight.mul_(3.0)
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(4.0, rel=1e-5)
    gp = gradient_penalty(unit, real, fake[:10])  # unequal sizes: uses the common prefix
    gp.backward()
    assert unit.weight.grad is not None


def test_baseline_loss_regularises_the_critic_only_when_not_detached():
    values = torch.zeros(4, requires_grad=True)
    returns = torch.ones(4, requires_grad=True)
    baseline_loss(values, returns).backward()
    assert returns.grad is not None and values.grad is not None
    assert baseline_loss(values, returns.detach()).item() == pytest.approx(1.0)


def test_policy_gradient_loss_holds_advantage_constant():
    log_prob = torch.tensor([1.0, 2.0], requires_grad=True)
    adv = torch.tensor([3.0, -1.0], requires_grad=True)
    loss = policy_gradient_loss(log_prob, adv)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)
    assert adv.grad is None
    torch.testing.assert_close(log_prob.grad, torch.tensor([1.5, -0.5]))


def test_dxmi_losses():
    from diffft.methods.losses import (
        avr_update,
        energy_loss,
        entropy_cost,
        running_cost,
        td_loss,
        time_cost,
    )

    e_real, e_fake = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.0])
    # E_data - E_model + gamma (E_data^2 + E_model^2): -0.75 - 0.5 + 2 (0.625 + 0.5)
    assert energy_loss(e_real, e_fake, 2.0).item() == pytest.approx(-1.25 + 2 * 1.125)
    lp, sq, s2 = torch.tensor([-3.0]), torch.tensor([4.0]), torch.tensor([2.0])
    total = running_cost(lp, sq, s2, tau1=0.1, tau2=0.5, dim=4, reduction="sum")
    assert total.item() == pytest.approx(0.1 * -3.0 + 0.5 * 4.0 / 4.0)
    mean = running_cost(lp, sq, s2, tau1=0.1, tau2=0.5, dim=4, reduction="mean")
    assert mean.item() == pytest.approx(total.item() / 4)
    assert entropy_cost(torch.tensor(0.5), 3).item() == pytest.approx(-1.5)
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0], requires_grad=True)
    td_loss(v, target).backward()
    assert target.grad is None and v.grad is not None  # the target is held fixed
    assert avr_update(torch.tensor(1.0), torch.tensor(3.0), 0.75).item() == pytest.approx(1.5)
    # The sigmoid time cost of T = 10 sums to 0.987 (specs/dxmi.md) and is largest mid-chain.
    r = time_cost("sigmoid", 10)
    assert r[0] == 0 and r[1:].sum().item() == pytest.approx(0.987, abs=1e-3)
    assert r.argmax().item() == 5
    assert torch.all(time_cost("linear", 4)[1:] == 0.05)
    with pytest.raises(ValueError, match="method.time_cost"):
        time_cost("cubic", 4)

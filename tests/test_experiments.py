"""The scripts under experiments/ that compute a reported number (not the benchmarks)."""

import importlib.util
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from tests.test_chain import GaussianEps

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chain_scale_follows_the_states_from_noise_to_data():
    chain_scale = load_script("chain_scale")
    betas = beta_schedule("linear", 1000, 1e-4, 2e-2)
    # The exact eps of N(0, 0.5^2) data: a fine DDIM chain ends near sd 0.5 (10 coarse steps
    # end at 0.36: the discretisation, not the script).
    fine = subsample(betas, 100, "uniform")
    exact = GaussianChain(GaussianEps(alpha_bar(betas), 0.5), fine, (2,), "ddim", eta=0.0)
    scale = chain_scale.state_scale(exact, 4000)
    assert len(scale) == 101
    assert abs(scale[0][0] - 1.0) < 0.05  # x_K ~ N(0, I)
    assert abs(scale[-1][0] - 0.5) < 0.05
    # eps = 0: every DDIM step rescales x by sqrt(ab_prev / ab_k), so the states grow to
    # sd 1 / sqrt(ab_K) at x_0 (the blow-up the script is there to show).
    steps = subsample(betas, 10, "uniform")
    zero = GaussianChain(ZeroEps(), steps, (2,), "ddim", eta=0.0)
    sds = [sd for sd, _ in chain_scale.state_scale(zero, 4000)]
    assert all(b > a for a, b in pairwise(sds))
    expected = float(steps.alpha_bar[-1]) ** -0.5
    assert abs(sds[-1] / expected - 1) < 0.05


class ZeroEps(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

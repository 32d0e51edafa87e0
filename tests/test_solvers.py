"""Training-free solvers from diffusers behind the ``Sampler`` protocol."""

import pytest
import torch

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.sampler import Sampler, SchedulerSampler
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.nets.mlp import TimeMLP
from tests.test_chain import GaussianEps


def test_diffusers_ddim_is_our_chain_with_ddim_and_eta_zero():
    betas = beta_schedule("linear", 96)
    torch.manual_seed(0)
    net = TimeMLP(2, 96, width=16, depth=2)
    ours = GaussianChain(
        net, subsample(betas, 8, "trailing"), (2,), parameterisation="ddim", eta=0.0
    )
    ddim = SchedulerSampler(net, betas, 8, "ddim", (2,))
    assert isinstance(ours, Sampler) and isinstance(ddim, Sampler)
    with torch.no_grad():
        a = ours.sample(64, generator=torch.Generator().manual_seed(3))
        b = ddim.sample(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="steps=7 must divide T=96"):
        SchedulerSampler(net, betas, 7, "ddim", (2,))


def test_solvers_converge_to_a_gaussian_with_the_exact_score():
    betas = beta_schedule("linear", 1000)
    s = 0.5  # data ~ N(0, s^2 I): the exact eps-network is known in closed form
    eps = GaussianEps(alpha_bar(betas), s)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    err = {}
    for solver in ("ddim", "dpmpp2m"):
        for steps in (10, 200):
            x = SchedulerSampler(eps, betas, steps, solver, (2,)).sample(20_000, generator=g())
            err[solver, steps] = abs(x.std().item() - s) / s
    # measured: DDIM 0.26 / 0.013, DPM-Solver++(2M) 0.19 / 0.002 (first vs second order)
    assert err["ddim", 200] < 0.03 and err["dpmpp2m", 200] < 0.01
    assert err["dpmpp2m", 10] < err["ddim", 10] and err["ddim", 200] < err["ddim", 10] / 5
    sampler = SchedulerSampler(eps, betas, 10, "dpmpp2m", (2,))
    x = sampler.sample(20_000, generator=g(), batch_size=7_000)
    again = sampler.sample(20_000, generator=g(), batch_size=7_000)
    assert x.shape == (20_000, 2) and torch.equal(x, again)  # multistep state reset per call


def test_sample_cli_runs_a_solver_on_a_ddpm_checkpoint(make_cfg):
    from pathlib import Path

    from diffft.sample import sample_checkpoint
    from diffft.train import train

    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast")
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    ddim = sample_checkpoint(ckpt, n=50, steps=5, solver="ddim")
    dpm = sample_checkpoint(ckpt, n=50, steps=5, solver="dpmpp2m")
    assert ddim.shape == dpm.shape == (50, 2) and not (ddim == dpm).all()
    with pytest.raises(ValueError, match="solver=ddim needs steps"):
        sample_checkpoint(ckpt, n=5, solver="ddim")
    with pytest.raises(ValueError, match="solver='heun'"):
        sample_checkpoint(ckpt, n=5, steps=4, solver="heun")

"""DxMI / DxDP: the TD recursion against a closed-form cost-to-go, AVR's fixed point, the signs
of the energy and of value guidance, DxDP on a user's own cost, and diffft.score."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from diffft.data.toy import eight_gaussians
from diffft.methods.base import load_method
from diffft.methods.dxmi import DxMI
from diffft.train import train

DDPM_T3 = {
    "backbone": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 16, "depth": 1},
    "event_shape": [2],
    "schedule": {"name": "linear", "steps": 3, "beta_start": 0.1, "beta_end": 0.3},
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
}


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """A fixed terminal cost ||x||^2 (a user's own cost, given as method.reward._target_)."""
    return x.square().sum(1)


def distance_to(x: torch.Tensor, target: tuple[float, float] = (1.0, -1.0)) -> torch.Tensor:
    return (x - torch.tensor(target, device=x.device)).square().sum(1)


class QuadraticValue(nn.Module):
    """V_k(x) = a_k ||x||^2 + b_k: the exact form of a linear-Gaussian chain's cost-to-go."""

    def __init__(self, event_shape: list[int], n_steps: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(n_steps))
        self.b = nn.Parameter(torch.zeros(n_steps))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (self.a[k] * x.square().sum(1) + self.b[k])[:, None]


def _fit(method: L.LightningModule, batches: int, epochs: int) -> None:
    data = torch.zeros(batches * 64, 2)  # the real batch is not used by DxDP
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(method, loader)


@pytest.mark.parametrize("tau,td_update", [(0.0, "joint"), (0.5, "per_step")])
def test_td_learns_the_closed_form_cost_to_go_of_a_linear_gaussian_chain(tau, td_update):
    """A frozen chain x_{k-1} = c_k x_k + sigma_k noise (eps-net output 0), terminal cost
    ||x_0||^2 and fixed s_k: V_k(x) = A_k ||x||^2 + B_k with
    A_k = c_k^2 A_{k-1} + tau (1 - c_k)^2 / (2 s_k^2),
    B_k = B_{k-1} + D sigma_k^2 A_{k-1}
          + tau (D sigma_k^2 / (2 s_k^2) - D log sigma_k - D/2 log(2 pi e))."""
    L.seed_everything(0, verbose=False)
    method = DxMI(
        event_shape=[2],
        sampler={"steps": 3},
        cost={
            "_target_": "diffft.methods.costs.FixedReward",
            "value": {"_target_": "tests.test_dxmi.QuadraticValue"},
            "reward": {"_target_": "tests.test_dxmi.sq_norm"},
        },
        ddpm=DDPM_T3,
        tau=tau,
        lr={"sampler": 0.0, "sigma": 0.0, "value": 0.05},
        lr_schedule="cosine",  # to 0: the TD noise averages out
        avr_alpha=1.0,  # s_k fixed at sigma_k
        rollout_batch=256,
        td_update=td_update,
    )
    head = method.chain.eps_net.head
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    _fit(method, batches=50, epochs=30)
    chain, D = method.chain, 2
    c, sigma, s2 = chain.c_x.double(), chain.fixed_sigma.double(), method.avr_s2.double()
    A, B = [1.0], [0.0]
    for k in range(1, 4):
        A.append(c[k] ** 2 * A[-1] + tau * (1 - c[k]) ** 2 / (2 * s2[k]))
        entropy = -D * torch.log(sigma[k]) - D / 2 * math.log(2 * math.pi * math.e)
        B.append(
            B[-1] + D * sigma[k] ** 2 * A[k - 1] + tau * (D * sigma[k] ** 2 / (2 * s2[k]) + entropy)
        )
    learned = method.cost.value_net
    for k in range(1, 4):  # the value net's index k - 1 holds V_k (V_0 is the fixed cost)
        a, b = float(learned.a[k - 1].detach()), float(learned.b[k - 1].detach())
        assert a == pytest.approx(float(A[k]), rel=0.05, abs=0.02), (k, a, A[k])
        assert b == pytest.approx(float(B[k]), rel=0.05, abs=0.05), (k, b, B[k])


def test_avr_converges_to_the_mean_squared_step_over_d():
    L.seed_everything(0, verbose=False)
    method = DxMI(
        event_shape=[2],
        sampler={"steps": 3},
        cost={
            "_target_": "diffft.methods.costs.FixedReward",
            "value": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "depth": 1, "out_dim": 1},
            "reward": {"_target_": "tests.test_dxmi.sq_norm"},
        },
        ddpm=DDPM_T3,
        avr_alpha=0.9,
    )
    g = torch.Generator().manual_seed(0)
    traj = method.chain.sample(20_000, generator=g, return_trajectory=True)
    x_k, x_prev, _ = traj.transitions()
    sq = (x_k - x_prev).square().sum(1)
    for _ in range(200):  # the same rollout: the EMA's fixed point is its statistic
        method.avr_step(sq)
    expected = sq.view(3, -1).mean(1) / 2
    torch.testing.assert_close(method.avr_s2[1:], expected, rtol=1e-4, atol=1e-6)


def test_dxdp_lowers_a_users_own_cost(make_cfg):
    cfg = make_cfg(
        "experiment=eight_gaussians_dxmi",
        "method=dxdp",
        # the experiment's cost is a separate energy: name DxDP's fixed cost instead
        "method.cost._target_=diffft.methods.costs.FixedReward",
        "~method.cost.energy",
        "method.cost.reward._target_=tests.test_dxmi.distance_to",
        "debug=fast",
        "trainer.max_steps=-1",
        "trainer.max_epochs=8",
        "dataset.n_train=3200",  # 50 batches of 64: 400 iterations
        "eval.every_n_batches=0",
        "eval.compare=null",
        "eval.solvers=null",
        "eval.metrics=[sw]",
    )
    train(cfg)
    method = load_method(str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        tuned = distance_to(method.chain.sample(4000, generator=g())).mean()
        init = distance_to(method.init_chain.sample(4000, generator=g())).mean()
    assert method.main_row().energy is None  # a fixed cost: no learned energy, no AUC row
    assert tuned < 0.7 * init, (tuned, init)


def test_energy_is_low_on_data_and_value_guidance_lowers_it(make_cfg, tmp_path):
    cfg = make_cfg(
        "experiment=eight_gaussians_dxmi",
        "debug=fast",
        "trainer.max_steps=-1",
        "trainer.max_epochs=20",
        "dataset.n_train=3200",  # 50 batches of 64: 1000 iterations
        "eval.every_n_batches=0",
        # A T = 5 DDPM of 2000 steps to start from (debug=fast's would be 3 steps)
        "pretrain.debug=null",
        'pretrain.overrides=["experiment=eight_gaussians_ddpm","method.schedule.steps=5",'
        '"trainer.max_steps=1000","eval.every_n_batches=0","eval.n=300","eval.draws=1",'
        '"callbacks.model_checkpoint.monitor=null"]',
        "eval.compare=null",
        "eval.solvers=null",
        "eval.metrics=[sw,auc]",
        "eval.n=1000",
        "method.guidance=[0.5]",
        "method.lr_schedule=constant",  # a short run: cosine would stop it in its early phase
    )
    rows = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "energy.png").is_file() and (out / "values.png").is_file()
    assert rows["DxMI T=5"]["auc"] and not rows["DDPM T=5 (init)"]["auc"]
    assert min(rows["DxMI T=5"]["auc"]) > 0.6
    method = load_method(str(out / "checkpoints/last.ckpt")).eval()
    g = torch.Generator().manual_seed(1)
    real = torch.as_tensor(eight_gaussians(5000, 7), dtype=torch.float32)
    noise = torch.rand(5000, 2, generator=g) * 8 - 4
    with torch.no_grad():
        assert method.energy_fn(real).mean() < method.energy_fn(noise).mean()
    guided = {r.label: r.sampler for r in method.rows()}["DxMI T=5 + value guidance λ=0.5"]
    with torch.no_grad():
        plain_x = method.chain.sample(5000, generator=torch.Generator().manual_seed(2))
        guided_x = guided.sample(5000, generator=torch.Generator().manual_seed(2))
        assert method.energy_fn(guided_x).mean() < method.energy_fn(plain_x).mean()

    # diffft.score writes the energy of any points file
    pts = tmp_path / "pts.npy"
    np.save(pts, np.stack([real[:10].numpy(), noise[:10].numpy()]).reshape(20, 2))
    energy = tmp_path / "energy.npy"
    ckpt = out / "checkpoints/last.ckpt"
    cmd = [sys.executable, "-m", "diffft.score", f"ckpt={ckpt}", f"in={pts}", f"out={energy}"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    e = np.load(energy)
    assert e.shape == (20,) and e.dtype == np.float32
    with torch.no_grad():
        expected = method.energy_fn(torch.as_tensor(np.load(pts))).numpy()
    np.testing.assert_allclose(e, expected, rtol=1e-5, atol=1e-6)
    bad = subprocess.run(
        [sys.executable, "-m", "diffft.score", f"ckpt={ckpt}", f"in={tmp_path}/none.npy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "in: no such file" in bad.stderr


def test_bad_dxmi_keys_name_the_key():
    kwargs = {"event_shape": [2], "sampler": {"steps": 3}, "ddpm": DDPM_T3}
    value = {"_target_": "diffft.nets.mlp.TimeMLP"}
    shared = {"_target_": "diffft.methods.costs.SharedTimeValue", "value": value}
    with pytest.raises(ValueError, match="method.running_cost_reduction"):
        DxMI(**kwargs, cost=shared, running_cost_reduction="avg")
    with pytest.raises(ValueError, match="method.lr_schedule='linear'"):
        DxMI(**kwargs, cost=shared, lr_schedule="linear")
    with pytest.raises(ValueError, match="method.cost.time_cost='cubic'"):
        DxMI(**kwargs, cost={**shared, "time_cost": "cubic"})
    with pytest.raises(ValueError, match="method.cost._target_='no_such.Cost' cannot be"):
        DxMI(**kwargs, cost={**shared, "_target_": "no_such.Cost"})
    with pytest.raises(ValueError, match="method.cost._target_='torch.nn.Linear': expected"):
        DxMI(**kwargs, cost={**shared, "_target_": "torch.nn.Linear"})
    reward = {**shared, "_target_": "diffft.methods.costs.FixedReward"}
    with pytest.raises(ValueError, match="method.cost.reward._target_='no_such.cost'"):
        DxMI(**kwargs, cost={**reward, "reward": {"_target_": "no_such.cost"}})
    with pytest.raises(ValueError, match="method.cost.reward_is='gain'"):
        DxMI(**kwargs, cost={**reward, "reward": {"_target_": "x.y"}, "reward_is": "gain"})
    with pytest.raises(ValueError, match="picks SeparateEnergyValue: a fixed cost"):
        separate = {**shared, "_target_": "diffft.methods.costs.SeparateEnergyValue"}
        DxMI(**kwargs, cost={**separate, "energy": {}, "reward": {"_target_": "x.y"}})
    with pytest.raises(ValueError, match="needs a network without a time input"):
        DxMI(**kwargs, cost={**shared, "_target_": "diffft.methods.costs.TimeIndependentValue"})


QUADRATIC = {"_target_": "tests.test_dxmi.QuadraticValue"}
SMALL_ENERGY = {"_target_": "diffft.nets.mlp.MLP", "width": 8, "depth": 1}
SEPARATE = "diffft.methods.costs.SeparateEnergyValue"


def _small(**kw):
    L.seed_everything(0, verbose=False)
    base = {"event_shape": [2], "sampler": {"steps": 3}, "ddpm": DDPM_T3}
    return DxMI(**{**base, **kw})


def test_value_guidance_descends_the_value_of_the_step_just_reached():
    method = _small(cost={"_target_": SEPARATE, "value": QUADRATIC, "energy": SMALL_ENERGY})
    with torch.no_grad():
        method.cost.value_net.a.copy_(torch.tensor([0.5, 1.0, 2.0]))  # V_1, V_2, V_3
    assert not any("guidance" in r.label for r in method.rows())  # none by default
    method.hparams.guidance = [0.3]
    guided = {r.label: r.sampler for r in method.rows()}["DxMI T=3 + value guidance λ=0.3"]
    x = torch.randn(5, 2)
    out = guided.guide(x, 2)  # after the step out of x_3: x_2 - lambda sigma_3 grad V_2(x_2)
    sigma_3 = method.chain.sigma(torch.full((5,), 3)).detach()
    torch.testing.assert_close(out, x - 0.3 * sigma_3 * 2 * 1.0 * x)


def test_sampler_step_with_entropy_raises_sigma_and_value_fn_keeps_the_row_order():
    # A flat value: only the entropy term -tau1 D log sigma acts on sigma (tau2 = 0).
    method = _small(
        cost={"_target_": SEPARATE, "value": QUADRATIC, "energy": SMALL_ENERGY},
        tau1=0.5,
        tau2=0.0,
        lr={"sampler": 0.0, "sigma": 0.05, "value": 0.0, "energy": 0.0},
        lr_schedule="constant",
        avr_alpha=1.0,
    )
    for p in method.cost.energy_net.parameters():
        nn.init.zeros_(p)
    before = method.chain.log_sigma.detach().clone()
    _fit(method, batches=5, epochs=2)
    assert torch.all(method.chain.log_sigma[1:] > before[1:])
    # V_k over a batch of mixed steps equals each point's own V_k (V_0 = the energy).
    x, k = torch.randn(6, 2), torch.tensor([0, 2, 1, 0, 3, 1])
    with torch.no_grad():
        mixed = method.value_fn(x, k)
        one = torch.cat([method.value_fn(x[i : i + 1], k[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(mixed, one)


def test_a_shared_energy_is_the_values_step_zero():
    value = {"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "depth": 1, "out_dim": 1}
    method = _small(cost={"_target_": "diffft.methods.costs.SharedTimeValue", "value": value})
    net = method.cost.value_net
    assert set(method._parts()) == {"sampler", "sigma", "value"} and net.n_steps == 4  # V_0..V_3
    x = torch.randn(4, 2)
    with torch.no_grad():
        zero = torch.zeros(4, dtype=torch.long)
        torch.testing.assert_close(method.energy_fn(x), net(x, zero).view(-1))

"""The distillation baselines: progressive distillation (Salimans & Ho 2022) and consistency
distillation (Song et al. 2023): their maths on hand-made networks, every experiment end to end,
checkpoints that load and sample on their own, and an exact resume across a round boundary."""

import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.methods.base import load_method
from diffft.methods.consistency import ConsistencyDistillation, consistency_fn
from diffft.methods.progressive import ProgressiveDistillation, distillation_target
from diffft.sample import checkpoint_sampler, sample_checkpoint
from diffft.train import Interrupted, train
from tests.test_resume import _compare

BETAS = beta_schedule("sigmoid", 1000, 1e-5, 1e-2)
DDPM = {
    "backbone": {"_target_": "diffft.nets.mlp.SinusoidalTimeMLP", "width": 8, "depth": 1},
    "event_shape": [2],
    "schedule": {"name": "sigmoid", "steps": 1000, "beta_start": 1e-5, "beta_end": 1e-2},
    "optimizer": {"_target_": "torch.optim.Adam"},
}


class LinearEps(nn.Module):
    """eps(x, t) = x A + (t / 1000) b: a fixed linear function of x and t."""

    A = torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=torch.float64)
    b = torch.tensor([0.4, -0.7], dtype=torch.float64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).view(-1, 1) / 1000
        return x @ self.A.to(x.dtype) + t * self.b.to(x.dtype)


def ddim_step(z: torch.Tensor, t: int, t_next: int | None) -> torch.Tensor:
    """One DDIM (eta 0) step by hand, float64: from network time t to t_next (None: data)."""
    ab_full = alpha_bar(BETAS)
    ab, ab_next = ab_full[t], 1.0 if t_next is None else ab_full[t_next]
    eps = LinearEps()(z, torch.full((z.shape[0],), t))
    x0 = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * eps


def test_progressive_target_is_two_teacher_ddim_steps_in_one_student_step():
    teacher = GaussianChain(LinearEps(), subsample(BETAS, 8, "trailing"), (2,), "ddim", eta=0.0)
    student = GaussianChain(LinearEps(), subsample(BETAS, 4, "trailing"), (2,), "ddim", eta=0.0)
    # The halved grid is every other point of the teacher's (t, t' and t'' of Alg. 2).
    assert torch.equal(student.net_t[1:], teacher.net_t[2::2])
    tau = [int(t) for t in teacher.net_t[1:]]  # network times of the teacher's states 1..8
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = torch.arange(1, 5)  # every student step, from the last (k = 1 lands on the data)
    eps_tilde, weight = distillation_target(teacher, student, z.float(), k)
    for i, kk in enumerate(k.tolist()):
        t, t1 = tau[2 * kk - 1], tau[2 * kk - 2]
        t2 = tau[2 * kk - 3] if kk > 1 else None
        two = ddim_step(ddim_step(z[i : i + 1], t, t1), t1, t2)  # teacher: t -> t' -> t''
        # One student DDIM step t -> t'' whose eps is the target.
        ab = alpha_bar(BETAS)[t]
        ab2 = 1.0 if t2 is None else alpha_bar(BETAS)[t2]
        e = eps_tilde[i : i + 1].double()
        one = ab2**0.5 * (z[i : i + 1] - (1 - ab).sqrt() * e) / ab.sqrt() + (1 - ab2) ** 0.5 * e
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
        # max(SNR, 1) on the x-error = max(1, 1 / SNR) on the eps-error (truncated SNR, Sec. 4)
        assert weight[i].item() == pytest.approx(max(1.0, float((1 - ab) / ab)), rel=1e-5)


def test_consistency_function_is_the_identity_at_t_min_and_one_step_sampling_is_one_call():
    method = ConsistencyDistillation(event_shape=[2], ddpm=DDPM, sigma_data=0.5, ema_decay=0)
    grid = method.chain
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    t_min = torch.ones(6, dtype=torch.long)
    assert torch.equal(consistency_fn(grid.eps_net, grid, x, t_min, 0.5), x)  # f(x, t_min) = x
    t_max = torch.full((6,), grid.steps)
    assert not torch.allclose(consistency_fn(grid.eps_net, grid, x, t_max, 0.5), x)

    one = method.sampler(1)
    assert one.states == [grid.steps]  # from t_N = T - 1
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(7))
    sample = one.sample(6, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, one.f(noise, grid.steps), rtol=0, atol=0)
    assert method.sampler(4).states == [17, 13, 9, 5]  # grid points (N - 1 = 16 intervals)


def test_a_student_chain_per_round_and_bad_settings_name_the_key():
    method = ProgressiveDistillation(event_shape=[2], ddpm=DDPM, start_steps=16, min_steps=2)
    assert [c.steps for c in method.students] == [8, 4, 2]
    rows = method.rows()
    assert [(r.id, r.role, r.nfe) for r in rows] == [
        ("pd_2", "main", 2),
        ("init", "init", 16),
        ("pd_8", "variant", 8),
        ("pd_4", "variant", 4),
    ]
    with pytest.raises(ValueError, match="method.start_steps=12"):
        ProgressiveDistillation(event_shape=[2], ddpm=DDPM, start_steps=12, min_steps=2)
    with pytest.raises(ValueError, match="method.nfe"):
        ConsistencyDistillation(event_shape=[2], ddpm=DDPM, grid_steps=5, nfe=[1, 5])
    with pytest.raises(ValueError, match="method.distance"):
        ConsistencyDistillation(event_shape=[2], ddpm=DDPM, distance="l1")


QUICK = ["debug=fast", "trainer.max_steps=6", "eval.draws=1", "eval.metrics=[sw]"]
EXPERIMENTS = {
    "swiss_roll_progressive": ["method.start_steps=8", "method.steps_per_round=2"],
    "eight_gaussians_progressive": ["method.start_steps=8", "method.steps_per_round=2"],
    "swiss_roll_consistency": [],
    "eight_gaussians_consistency": [],
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_runs_and_its_checkpoint_loads_and_samples(experiment, make_cfg):
    cfg = make_cfg(f"experiment={experiment}", *QUICK, *EXPERIMENTS[experiment])
    rows = train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    method = load_method(ckpt).eval()  # from its hyper-parameters alone (no DDPM file)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in saved.items())
    ours = [r for r in method.rows() if r.role != "init"]
    assert {r.label for r in method.rows()} <= set(rows)  # every row is in the table
    for row in ours:  # diffft.sample steps=K picks the row of nfe K
        a = checkpoint_sampler(ckpt, steps=row.nfe).sample(5, generator=torch.manual_seed(3))
        b = row.sampler.sample(5, generator=torch.manual_seed(3))
        assert a.shape == (5, 2) and torch.equal(a, b), row.id
    assert sample_checkpoint(ckpt, n=5, steps=ours[-1].nfe).shape == (5, 2)
    with pytest.raises(ValueError, match="steps=3: this checkpoint samples with"):
        checkpoint_sampler(ckpt, steps=3)
    teacher = method.init_chain.eps_net.state_dict()
    if isinstance(method, ProgressiveDistillation):  # 6 steps: every round trained, in order
        assert [r.id for r in ours] == ["pd_1", "pd_4", "pd_2"]
        for student in method.students:
            trained = student.eps_net.state_dict()
            assert not all(torch.equal(trained[k], v) for k, v in teacher.items())
        last = method.students[-1].eps_net.state_dict()
        assert all(torch.equal(last[k], v) for k, v in method.chain.eps_net.state_dict().items())
    else:
        assert [r.id for r in ours] == ["cd_1", "cd_2", "cd_4"]
        assert float(method.sigma_data) != 0.5  # measured on the data
        target = method.target_net.state_dict()
        assert not all(torch.equal(target[k], v) for k, v in teacher.items())


def test_interrupted_progressive_run_resumes_exactly_across_a_round_boundary(make_cfg, tmp_path):
    common = [
        "experiment=eight_gaussians_progressive",
        *QUICK,
        "method.start_steps=8",
        "method.steps_per_round=4",
        "trainer.max_steps=12",  # 3 rounds of 4 batches
        "dataset.n_train=1000",
        "eval.compare=null",
        "eval.solvers=null",
    ]
    full = make_cfg(*common, f"paths.output_dir={tmp_path}/full")
    train(full)
    cut = make_cfg(
        *common,
        f"paths.output_dir={tmp_path}/cut",
        "+callbacks.interrupt={_target_: tests.test_resume.CtrlCAt, at: 4}",  # round 0's end
    )
    try:
        with pytest.raises(Interrupted):
            train(cut)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    last = tmp_path / "cut/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["diffft_batches_done"] == 4
    train(make_cfg(*common, f"paths.output_dir={tmp_path}/resumed", f"ckpt_path={last}"))
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    _compare(a, b)  # weights of every round, the optimiser (reset at each round), the counter

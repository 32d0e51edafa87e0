"""SFT-PG end to end: fine-tuning improves a bad DDPM, and checkpoints restore everything."""

from pathlib import Path

import pytest
import torch

from diffft.methods.base import load_method
from diffft.train import train

# 2000 RMSprop steps at a constant lr with a short EMA: far from converged (SW ~0.3 vs ~0.08),
# but not pure noise.
BAD_DDPM = (
    'pretrain.overrides=["experiment=swiss_roll_ddpm","trainer.max_steps=2000",'
    '"method.optimizer._target_=torch.optim.RMSprop","method.optimizer.lr=1e-3",'
    '"method.lr_schedule=constant","method.ema_decay=0.99","eval.n=1000","eval.draws=1"]'
)
QUICK_EVAL = [
    "eval.n=2000",
    "eval.draws=2",
    "eval.metrics=[sw]",
    "eval.every_n_batches=0",
    "callbacks.model_checkpoint.monitor=null",
    "~eval.compare",  # no extra DDPM rows (the T=1000 one would be trained for 40K steps)
]


@pytest.mark.parametrize("method", ["sft_pg", "sft_pathwise"])
def test_short_fine_tuning_from_a_bad_ddpm_lowers_the_metric(method, make_cfg):
    cfg = make_cfg(
        "experiment=swiss_roll_sft_pg_fast",
        f"method={method}",
        BAD_DDPM,
        "trainer.max_epochs=6",
        "method.ema_decay=0",  # the estimator itself, not an average that lags behind it
        *QUICK_EVAL,
    )
    rows = train(cfg)
    tuned = next(v["sw"] for k, v in rows.items() if k.startswith("SFT"))
    init = rows["DDPM T'=10 (init)"]["sw"]
    assert max(tuned) < 0.9 * min(init), (tuned, init)


def test_checkpoint_restores_three_optimisers_counters_and_buffer(make_cfg, tmp_path):
    common = [
        "experiment=swiss_roll_sft_pg",
        "debug=fast",
        "trainer.max_epochs=-1",
        "~eval.compare",
    ]
    cfg = make_cfg(*common, "trainer.max_steps=16")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    # The sampler's optimiser, and the critic's and baseline's (two parameter groups).
    assert len(ckpt["optimizer_states"]) == 2
    assert [len(s["param_groups"]) for s in ckpt["optimizer_states"]] == [1, 2]
    assert all(s["state"] for s in ckpt["optimizer_states"])  # Adam moments of every part
    states = ckpt["optimizer_states"][1]["state"]
    assert len(states) == sum(len(g["params"]) for g in ckpt["optimizer_states"][1]["param_groups"])
    it = ckpt["diffft_batches_done"]  # the method's one counter: its iterations
    # global_step counts every optimiser step: critic+baseline per iteration, generator once
    # per n_critic = 5 iterations.
    assert ckpt["global_step"] == it + it // 5 >= 16
    assert len(ckpt["sft_pg_buffer"]) == it % 5  # rollouts since the last generator phase

    resumed = make_cfg(
        *common, "trainer.max_steps=30", f"ckpt_path={last}", f"paths.output_dir={tmp_path}/resumed"
    )
    train(resumed)
    ckpt2 = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    it2 = ckpt2["diffft_batches_done"]
    assert it2 > it and ckpt2["global_step"] == it2 + it2 // 5 >= 30

    # A fine-tuned checkpoint loads on its own (no DDPM file needed) and samples.
    method = load_method(str(tmp_path / "resumed/checkpoints/last.ckpt"))
    assert method.chain.steps == 10
    assert method.eval_chain.sample(5).shape == (5, 2)


def test_learned_sigma_is_trained_by_the_policy_gradient_and_reloads(make_cfg):
    cfg = make_cfg(
        "experiment=swiss_roll_sft_pg",
        "debug=fast",
        "method.sampler.learn_sigma=true",
        "method.sampler.steps=4",
        "method.lr.generator=1e-2",
        "trainer.max_epochs=-1",
        "trainer.max_steps=20",  # 2 generator phases
        "~eval.compare",
    )
    rows = train(cfg)
    assert "SFT-PG (learned sigma_k) T'=4" in rows  # not the paper's method: labelled
    method = load_method(str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"))
    fixed = method.init_chain.fixed_sigma[1:]
    assert torch.allclose(method.init_chain.log_sigma.exp()[1:], fixed)  # the "before" row
    for chain in (method.chain, method.eval_chain):  # the sampler and its EMA
        learned = chain.log_sigma.exp()[1:]
        assert not torch.allclose(learned, fixed), (learned, fixed)
    assert method.eval_chain.sample(5).shape == (5, 2)


def test_generator_minibatches_are_full_when_steps_exceed_the_buffer():
    from diffft.methods.sft_pg import SFTPG

    ddpm = {
        "backbone": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "depth": 1},
        "event_shape": [2],
        "schedule": {"name": "sigmoid", "steps": 4, "beta_start": 1e-5, "beta_end": 1e-2},
        "optimizer": {"_target_": "torch.optim.Adam"},
    }
    method = SFTPG(
        event_shape=[2],
        sampler={"steps": 4},
        critic={"_target_": "diffft.nets.mlp.MLP", "width": 8},
        baseline={"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "out_dim": 1},
        ddpm=ddpm,
        n_generator=7,
        generator_batch=3,
    )
    method.buffer = [method.chain.sample(2, return_trajectory=True).states]  # 8 transitions
    sizes = []
    method.manual_step = lambda opts, loss_of, n, **kw: loss_of(slice(0, n)).detach()
    log_prob = method.chain.log_prob
    method.chain.log_prob = lambda *a: sizes.append(a[0].shape[0]) or log_prob(*a)
    method.policy_gradient_steps(None, torch.Generator().manual_seed(0))
    assert [s for s in sizes if isinstance(s, int)] == [3] * 7  # 7 x 3 > 8: no short batch


def test_policy_gradient_refuses_a_chain_without_density(make_cfg):
    cfg = make_cfg(
        "experiment=swiss_roll_sft_pg", "debug=fast", "+method.sampler.variance=posterior"
    )
    with pytest.raises(ValueError, match="method.estimator=policy_gradient .* k=\\[1\\]"):
        train(cfg)

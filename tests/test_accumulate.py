"""Gradient accumulation over chunks of transitions (``method.grad_chunk``): the same updates as
one backward pass over all of them, for SFT-PG's policy-gradient steps and DxMI's TD and sampler
updates (the DDP reduction of accumulated chunks is checked in test_ddp)."""

import lightning as L
import pytest
import torch

from diffft.methods.dxmi import DxMI
from diffft.methods.sft_pg import SFTPG

DDPM = {
    "backbone": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 16, "depth": 1},
    "event_shape": [2],
    "schedule": {"name": "linear", "steps": 3, "beta_start": 0.1, "beta_end": 0.3},
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
}
# SGD: the update is proportional to the gradient (Adam would hide a mis-scaled one).
SGD = {"_target_": "torch.optim.SGD"}


def fit(method: L.LightningModule, batches: int = 4) -> dict[str, torch.Tensor]:
    data = torch.randn(batches * 16, 2, generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(method, torch.utils.data.DataLoader(data, batch_size=16))
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def sft_pg(chunk: int | None) -> SFTPG:
    L.seed_everything(0, verbose=False)
    return SFTPG(
        event_shape=[2],
        sampler={"steps": 3},
        critic={"_target_": "diffft.nets.mlp.MLP", "width": 8},
        baseline={"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "out_dim": 1},
        ddpm=DDPM,
        n_critic=1,
        n_generator=2,
        rollout_batch=8,
        generator_batch=10,  # chunks of 4: 4 + 4 + 2 (an uneven last chunk)
        lr={"generator": 1.0, "critic": 1e-3, "baseline": 1e-3},
        optimizer=SGD,
        grad_chunk=chunk,
    )


def dxmi(chunk: int | None, td_update: str) -> DxMI:
    L.seed_everything(0, verbose=False)
    return DxMI(
        event_shape=[2],
        sampler={"steps": 3},
        cost={
            "_target_": "diffft.methods.costs.SeparateEnergyValue",
            "value": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "out_dim": 1},
            "energy": {"_target_": "diffft.nets.mlp.MLP", "width": 8},
        },
        ddpm=DDPM,
        rollout_batch=10,  # TD over 30 transitions (joint) or 10 per step
        sampler_batch=10,
        td_update=td_update,
        lr_schedule="constant",
        lr={"sampler": 1e-2, "sigma": 1e-2, "value": 1e-2, "energy": 1e-3},
        optimizer=SGD,
        grad_chunk=chunk,
    )


def assert_same_updates(a: dict, b: dict, moved_from: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # the sampler's updates did something (well above the tolerance)
    moved = [(a[k] - moved_from[k]).abs().max() for k in a if k.startswith("chain.")]
    assert max(moved) > 1e-3


def test_sft_pg_policy_gradient_steps_accumulated_over_chunks_are_the_same_steps():
    start = {k: v.clone() for k, v in sft_pg(None).state_dict().items()}
    assert_same_updates(fit(sft_pg(None)), fit(sft_pg(4)), start)


@pytest.mark.parametrize("td_update", ["joint", "per_step"])
def test_dxmi_td_and_sampler_updates_accumulated_over_chunks_are_the_same_updates(td_update):
    start = {k: v.clone() for k, v in dxmi(None, td_update).state_dict().items()}
    whole, chunked = fit(dxmi(None, td_update)), fit(dxmi(3, td_update))
    assert_same_updates(whole, chunked, start)


def test_accumulate_weights_each_chunk_by_its_share_and_counts_calls():
    method = dxmi(None, "joint")
    seen = []

    class Opt:
        def zero_grad(self):
            seen.append("zero")

        def step(self):
            seen.append("step")

    method.manual_backward = lambda loss: seen.append(round(float(loss), 6))
    x = torch.arange(10.0)
    total = method.accumulate([Opt()], 10, lambda b: x[b].mean(), 4, "value")
    # chunks [0..3], [4..7], [8, 9]: means 1.5, 5.5, 8.5 weighted 0.4, 0.4, 0.2
    assert seen == ["zero", 0.6, 2.2, 1.7, "step"]
    assert float(total) == pytest.approx(4.5)  # the mean over all 10

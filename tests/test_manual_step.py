"""The fine-tuning methods' shared bookkeeping: one optimiser step (``manual_step``: only the
stepped part gets gradients, clipping per optimiser), one counter (``batches_done``), the cosine
learning rate as Lightning schedulers (the closed form, exactly), and checkpoints from before
these (an ``iteration`` buffer, no scheduler state, DxMI's top-level value / energy keys) that
still load, through ``load_method`` and through a Lightning resume."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from diffft.methods.base import load_method
from diffft.methods.dxmi import DxMI
from diffft.methods.sft_pg import SFTPG

DDPM = {
    "backbone": {"_target_": "diffft.nets.mlp.TimeMLP", "width": 16, "depth": 1},
    "event_shape": [2],
    "schedule": {"name": "linear", "steps": 3, "beta_start": 0.1, "beta_end": 0.3},
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
}
VALUE = {"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "depth": 1, "out_dim": 1}
ENERGY = {"_target_": "diffft.nets.mlp.MLP", "width": 8, "depth": 1}
SEPARATE = {
    "_target_": "diffft.methods.costs.SeparateEnergyValue",
    "value": VALUE,
    "energy": ENERGY,
}
LR = {"sampler": 1e-2, "sigma": 1e-2, "value": 1e-2, "energy": 1e-2}
BATCHES = 4  # per epoch


def dxmi(**kw) -> DxMI:
    L.seed_everything(0, verbose=False)
    base = {"event_shape": [2], "sampler": {"steps": 3}, "cost": SEPARATE, "ddpm": DDPM}
    return DxMI(**{**base, "rollout_batch": 8, "sampler_batch": 8, "lr": LR, **kw})


def sft_pg(**kw) -> SFTPG:
    L.seed_everything(0, verbose=False)
    return SFTPG(
        event_shape=[2],
        sampler={"steps": 3},
        critic={"_target_": "diffft.nets.mlp.MLP", "width": 8},
        baseline={"_target_": "diffft.nets.mlp.TimeMLP", "width": 8, "out_dim": 1},
        ddpm=DDPM,
        n_critic=2,
        rollout_batch=8,
        **kw,
    )


class StopAfterEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def fit(method, epochs: int, ckpt_path=None, callbacks=(), save=None) -> dict:
    data = torch.randn(BATCHES * 8, 2, generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer.fit(method, loader, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


class Record(L.Callback):
    """Each optimiser step's gradients of the value and energy networks, and its rate."""

    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.cost.parameters()]
        self.steps.append(
            {
                "batch": pl_module.batches_done,
                "opt": next(i for i, o in enumerate(trainer.optimizers) if o is optimizer),
                "grads": [None if g is None else g.clone() for g in grads],
                "lr": optimizer.param_groups[0]["lr"],
            }
        )


def test_the_sampler_step_leaves_the_value_and_energy_gradients_alone():
    method, record = dxmi(lr_schedule="constant", grad_clip=1e-3), Record()
    fit(method, epochs=1, callbacks=[record])
    # per batch: energy (opt 3), value (2), sampler (0), sigma (1); the value and energy
    # gradients at the sampler's steps are those their own steps left (none added)
    by_batch = {}
    for step in record.steps:
        by_batch.setdefault(step["batch"], {})[step["opt"]] = step["grads"]
    for steps in by_batch.values():
        assert list(steps) == [3, 2, 0, 1]
        for own, later in zip(steps[2], steps[0], strict=True):
            assert own is not None and later is not None and torch.equal(own, later)
    # and every part's parameters require gradients again after each step
    assert all(p.requires_grad for part in method._parts().values() for p in part)


def test_grad_clip_clips_each_sampler_optimiser_and_logs_the_norm_before():
    method = dxmi(lr_schedule="constant", grad_clip=1e-3)
    seen = []
    clip = method.clip_gradients

    def recording(optimizer, value, algorithm):
        seen.append(next(i for i, o in enumerate(method.trainer.optimizers) if o is optimizer))
        return clip(optimizer, value, algorithm)

    method.clip_gradients = recording
    fit(method, epochs=1)
    assert seen == [0, 1] * BATCHES  # the sampler and sigma steps only, each on its own


def test_cosine_rates_are_the_closed_form_of_the_run_s_batches():
    method, record = dxmi(lr_schedule="cosine"), Record()
    fit(method, epochs=2, callbacks=[record])
    total = 2 * BATCHES
    for step in record.steps:
        part = ["sampler", "sigma", "value", "energy"][step["opt"]]
        factor = 0.5 * (1 + math.cos(math.pi * min(step["batch"] - 1, total) / total))
        assert step["lr"] == LR[part] * factor  # exactly DxMI's rate before the schedulers
    assert method.batches_done == total
    assert [s.last_epoch for s in method.schedulers()] == [total] * 4


def test_sft_pg_cosine_rates_reach_zero_when_max_steps_ends_the_run(recwarn):
    # n_critic = 2: 7 optimiser steps = 5 batches (5 critic steps, 2 generator steps)
    method = sft_pg(lr_schedule="cosine", lr={"generator": 1e-3, "critic": 1e-3, "baseline": 2e-3})
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(method, torch.utils.data.DataLoader(data, batch_size=8))
    assert method.batches_done == method.total_batches() == 5 and trainer.global_step == 7
    assert [s.last_epoch for s in method.schedulers()] == [5, 5]
    assert [g["lr"] for o in trainer.optimizers for g in o.param_groups] == [0.0, 0.0, 0.0]
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]


def _as_old_checkpoint(path: Path, dxmi_keys: bool) -> Path:
    """The checkpoint as the version before ``manual_step`` wrote it: an ``iteration`` buffer,
    no scheduler state, no ``initial_lr`` in the optimisers; DxMI's value and energy networks
    at the top level, with ``value`` / ``energy`` / ``time_dependent`` ... hyper-parameters."""
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["state_dict"]
    state["iteration"] = torch.tensor(ckpt["diffft_batches_done"])
    ckpt["lr_schedulers"] = []
    for opt in ckpt["optimizer_states"]:
        for group in opt["param_groups"]:
            group.pop("initial_lr", None)
    if dxmi_keys:
        for key in list(state):
            for new, old in (("cost.value_net.", "value."), ("cost.energy_net.", "energy.")):
                if key.startswith(new):
                    state[old + key[len(new) :]] = state.pop(key)
        hp = ckpt["hyper_parameters"]
        cost = hp.pop("cost")
        hp.update(value=cost["value"], energy=cost["energy"], reward=None, reward_is="cost")
        hp.update(time_dependent=True, time_cost=None, time_cost_c=0.05)
    old = path.with_name("old.ckpt")
    torch.save(ckpt, old)
    return old


def test_an_old_dxmi_checkpoint_loads_and_resumes_exactly(tmp_path):
    straight = fit(dxmi(ema_decay=0.9), epochs=2)
    cut = tmp_path / "cut.ckpt"
    fit(dxmi(ema_decay=0.9), epochs=2, callbacks=[StopAfterEpoch(0)], save=cut)
    old = _as_old_checkpoint(cut, dxmi_keys=True)

    loaded = load_method(str(old))
    assert isinstance(loaded, DxMI)
    assert loaded.hparams.cost["_target_"] == "diffft.methods.costs.SeparateEnergyValue"
    new = torch.load(cut, weights_only=False)["state_dict"]
    assert loaded.state_dict().keys() == new.keys()
    assert all(torch.equal(v, new[k]) for k, v in loaded.state_dict().items())

    # A Lightning resume from it: the cosine rate continues where it was, the run ends exactly
    # as the uninterrupted one.
    resumed = fit(dxmi(ema_decay=0.9), epochs=2, ckpt_path=old)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_an_old_sft_pg_checkpoint_with_an_iteration_buffer_loads(tmp_path):
    cut = tmp_path / "cut.ckpt"
    trained = fit(sft_pg(), epochs=1, save=cut)
    assert "iteration" not in trained
    old = _as_old_checkpoint(cut, dxmi_keys=False)
    assert "iteration" in torch.load(old, weights_only=False)["state_dict"]
    loaded = load_method(str(old))
    assert loaded.batches_done == BATCHES
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    resumed = fit(sft_pg(), epochs=2, ckpt_path=old)
    assert resumed.keys() == trained.keys()


@pytest.mark.parametrize(
    "old,target",
    [
        ({"energy": None, "time_dependent": True}, "SharedTimeValue"),
        ({"energy": None, "time_dependent": False, "time_cost": "sigmoid"}, "TimeIndependentValue"),
        ({"energy": ENERGY, "time_dependent": False}, "SeparateEnergyValue"),
        ({"reward": {"_target_": "tests.test_dxmi.sq_norm"}}, "FixedReward"),
    ],
)
def test_old_dxmi_hyper_parameters_map_to_the_cost_module_that_computed_them(old, target):
    value = VALUE if old.get("time_dependent", True) else {**ENERGY, "out_dim": 1}
    hparams = {"event_shape": [2], "sampler": {"steps": 3}, "ddpm": DDPM, "value": value, **old}
    new = DxMI.upgrade_hparams(hparams)
    assert new["cost"]["_target_"] == f"diffft.methods.costs.{target}"
    assert not {"value", "energy", "reward", "time_dependent", "time_cost"} & set(new)
    method = DxMI(**new)
    assert type(method.cost).__name__ == target
    assert (method.cost.time_costs is not None) == (old.get("time_cost") is not None)

"""Mixed precision under manual and automatic optimisation.

On a GPU ``trainer.precision=16-mixed`` gives Lightning's fp16 autocast with a ``GradScaler``;
on the CPU Lightning would fall back to bf16, so the fp16 case here passes the same plugin with
a CPU ``GradScaler`` explicitly: ``manual_backward`` scales the loss, ``opt.step()`` unscales,
skips non-finite steps and updates the scale, and SFT-PG clips the unscaled gradients.
"""

import lightning as L
import pytest
import torch

from diffft.train import train

FP16_CPU = (
    "+trainer.plugins=[{_target_: lightning.pytorch.plugins.precision.MixedPrecision, "
    "precision: 16-mixed, device: cpu, scaler: {_target_: torch.amp.GradScaler, device: cpu}}]"
)


class ScalerProbe(L.Callback):
    """Counts optimiser steps the precision plugin's scaler took, and keeps the first
    parameters of the chain before and after training."""

    def __init__(self) -> None:
        self.steps, self.before, self.after, self.dtypes = 0, None, None, set()

    def on_train_start(self, trainer, pl_module):
        self.before = [p.detach().clone() for p in pl_module.chain.parameters()]
        net = pl_module.chain.eps_net
        forward = net.forward
        net.forward = lambda x, t: self.dtypes.add(forward(x, t).dtype) or forward(x, t)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module):
        self.after = [p.detach().clone() for p in pl_module.chain.parameters()]


PROBE = ScalerProbe()


@pytest.mark.parametrize("precision", ["16-mixed-cpu-scaler", "bf16-mixed"])
@pytest.mark.parametrize("experiment", ["swiss_roll_ddpm", "swiss_roll_sft_pg"])
def test_mixed_precision_runs_and_trains(precision, experiment, make_cfg, monkeypatch):
    probe = ScalerProbe()
    monkeypatch.setattr("tests.test_precision.PROBE", probe)
    extra = (
        ["trainer.precision=null", FP16_CPU]
        if precision.startswith("16")
        else [f"trainer.precision={precision}"]
    )
    cfg = make_cfg(
        f"experiment={experiment}",
        "debug=fast",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
        "dataset.n_train=1280",  # 10 batches: SFT-PG takes two generator phases
        "method.grad_clip=1.0",
        "eval.compare=null",
        "eval.solvers=null",
        "+callbacks.probe={_target_: tests.test_precision.probe_factory}",
        *extra,
    )
    rows = train(cfg)
    assert all(torch.isfinite(torch.tensor(v)).all() for r in rows.values() for v in r.values())
    moved = [not torch.equal(a, b) for a, b in zip(probe.before, probe.after, strict=True)]
    assert any(moved)  # the chain trained (steps were not all skipped)
    assert all(torch.isfinite(p).all() for p in probe.after)
    half = torch.float16 if precision.startswith("16") else torch.bfloat16
    assert half in probe.dtypes  # autocast ran the eps-network in half precision
    if precision.startswith("16"):
        assert probe.steps > 0  # optimiser steps went through the GradScaler


def probe_factory() -> ScalerProbe:
    return PROBE

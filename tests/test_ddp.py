"""Two-process DDP (``ddp_spawn`` on CPU, gloo): parameters stay identical on both ranks while
their data, noise and rollouts differ, an uneven row count does not hang, and the evaluation
runs once, outside the process group."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from diffft.train import train

PROBE = "tests.test_ddp.RankProbe"
# Under `make test`'s two pytest workers, the process groups of these tests never run at once.
pytestmark = pytest.mark.xdist_group("ddp")


class RankProbe(L.Callback):
    """Records, on each rank, the sums of the eps-network's first inputs (data + noise for the
    DDPM, rollout states for SFT-PG) and, at the end, every tensor of the module and the
    optimiser states."""

    def __init__(self, out: str) -> None:
        self.out, self.inputs = Path(out), []

    def setup(self, trainer, pl_module, stage):
        net = pl_module.chain.eps_net
        forward = net.forward

        def recording(x, t):
            if torch.is_grad_enabled() or len(self.inputs) < 50:
                self.inputs.append(float(x.double().sum()))
            return forward(x, t)

        net.forward = recording

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        opts = [o.state_dict() for o in trainer.optimizers]
        torch.save(
            {
                "inputs": self.inputs[:50],
                "state": state,
                "optimizers": opts,
                "batches": pl_module.batches_done,
                "process_group": torch.distributed.is_initialized(),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "experiment,extra",
    [
        ("swiss_roll_ddpm", ["trainer.max_steps=14"]),  # 10 batches per epoch: crosses one
        # Generator steps accumulated over 3 chunks (2 without the all-reduce): the ranks stay
        # identical only if the last backward reduces the accumulated gradient.
        (
            "swiss_roll_sft_pg",
            ["trainer.max_steps=-1", "trainer.max_epochs=2", "method.grad_chunk=50"],
        ),
        # AVR's s_k^2 (all-reduced) and the EMA stay identical across ranks; TD and sampler
        # updates accumulated over chunks
        (
            "eight_gaussians_dxmi",
            [
                "trainer.max_steps=-1",
                "trainer.max_epochs=2",
                "dataset.batch_size=128",
                "method.ema_decay=0.9",
                "method.grad_chunk=50",
                "eval.metrics=[sw]",
            ],
        ),
        # BPTT through a checkpointed chain under DDP (automatic optimisation)
        (
            "eight_gaussians_contrastive",
            [
                "trainer.max_steps=-1",
                "trainer.max_epochs=2",
                "method.n_chains=16",
                "method.train_steps=6",
                "method.sampler.steps=3",
                "eval.metrics=[sw]",
                "eval.compare=null",
                "eval.solvers=null",
            ],
        ),
    ],
)
def test_two_process_ddp_keeps_parameters_identical_and_draws_differ(
    experiment, extra, make_cfg, tmp_path
):
    cfg = make_cfg(
        f"experiment={experiment}",
        "debug=fast",
        "hardware=ddp_cpu",
        "trainer.strategy.start_method=spawn",
        "dataset.n_train=2561",  # 1280 rows per rank, 10 batches of 128 (was 11 vs 10)
        f"+callbacks.probe={{_target_: {PROBE}, out: '{tmp_path}'}}",
        *extra,
    )
    rows = train(cfg)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # The same parameters, EMA weights, buffers and optimiser states on both ranks ...
    _assert_same(ranks[0]["state"], ranks[1]["state"], "state_dict")
    _assert_same(ranks[0]["optimizers"], ranks[1]["optimizers"], "optimizers")
    # ... from different data, noise and rollouts (each rank its own stream and shard).
    a, b = ranks[0]["inputs"], ranks[1]["inputs"]
    assert len(a) == len(b) > 0 and all(x != y for x, y in zip(a, b, strict=True))
    expected = 14 if experiment == "swiss_roll_ddpm" else 20
    assert ranks[0]["batches"] == ranks[1]["batches"] == expected
    # Trained something: the parameters moved from the initial copy (SFT-PG) / the rows exist.
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(rows) and "data floor" in rows
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config and "batch_size: 256" in config
    assert not torch.distributed.is_initialized()


def test_a_sweep_with_the_popen_ddp_launcher_is_refused_before_it_runs(make_cfg):
    from hydra.types import RunMode

    from diffft.checks import check_launch

    cfg = make_cfg("experiment=swiss_roll_ddpm", "hardware=ddp_cpu")
    check_launch(cfg, RunMode.RUN)  # a single run: Lightning re-runs the command per rank
    with pytest.raises(ValueError, match="start_method=spawn"):
        check_launch(cfg, RunMode.MULTIRUN)
    check_launch(
        make_cfg("hardware=ddp_cpu", "trainer.strategy.start_method=spawn"), RunMode.MULTIRUN
    )
    check_launch(make_cfg("hardware=cpu"), RunMode.MULTIRUN)

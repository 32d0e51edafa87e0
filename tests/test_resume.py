"""Exact resume, and runs that fail early or stop cleanly.

A run interrupted by Ctrl-C in the middle of batch N and resumed from its
``last.ckpt`` ends with the same parameters, optimiser states, EMA, buffers and batch count as
the same run uninterrupted: the data order in the middle of an epoch and every random draw
(noise, t, rollouts, buffer minibatches) follow the method's own batch counter.
"""

import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from diffft.methods.base import NonFiniteLossError, load_method
from diffft.train import Interrupted, train


class CtrlCAt(L.Callback):
    """Sends this process a real SIGINT (Ctrl-C) in the middle of batch ``at``: between its
    backward pass and its (first) optimiser step."""

    def __init__(self, at: int) -> None:
        self.at, self.sent = at, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if pl_module.batches_done == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class PoisonAt(L.Callback):
    """Sets the first parameter of ``part`` to NaN before batch index ``at``."""

    def __init__(self, at: int, part: str) -> None:
        self.at, self.part = at, part

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            with torch.no_grad():
                next(pl_module.get_submodule(self.part).parameters()).fill_(float("nan"))


def _compare(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pa, pb in zip(oa["state"].values(), ob["state"].values(), strict=True):
            for k in pa:
                assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert a["diffft_batches_done"] == b["diffft_batches_done"]
    assert len(a.get("sft_pg_buffer", [])) == len(b.get("sft_pg_buffer", []))
    for x, y in zip(a.get("sft_pg_buffer", []), b.get("sft_pg_buffer", []), strict=True):
        assert torch.equal(x, y)


RESUME_CASES = {
    # 300 rows / 64 = 5 batches per epoch; interrupted in the middle of the third epoch.
    "ddpm": (
        ["experiment=swiss_roll_ddpm", "dataset.batch_size=64", "trainer.max_steps=18"],
        12,
    ),
    # 8 batches per epoch, n_critic = 5: interrupted mid-epoch with one rollout in the buffer
    # (and the periodic evaluation and checkpointing of debug=fast on).
    "sft_pg": (
        ["experiment=swiss_roll_sft_pg", "trainer.max_steps=-1", "trainer.max_epochs=3"],
        11,
    ),
    # 1000 rows / 64 = 16 batches per epoch: the energy, value, sampler and sigma optimisers,
    # the AVR state and the cosine learning rate, interrupted in the second epoch.
    "dxmi": (
        [
            "experiment=eight_gaussians_dxmi",
            "trainer.max_steps=-1",
            "trainer.max_epochs=2",
            "method.ema_decay=0.9",
        ],
        21,
    ),
    # 16 batches per epoch; the rollout with gradients (checkpointed) of every batch.
    "contrastive": (
        [
            "experiment=eight_gaussians_contrastive",
            "dataset.batch_size=64",
            "trainer.max_steps=12",
            "method.n_chains=16",
            "method.train_steps=6",
            "method.sampler.steps=3",
        ],
        7,
    ),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(case, make_cfg, tmp_path):
    overrides, at = RESUME_CASES[case]
    common = [
        *overrides,
        "debug=fast",
        "dataset.n_train=300" if case == "ddpm" else "dataset.n_train=1000",
    ]
    common += ["eval.compare=null", "eval.solvers=null", "eval.draws=1", "eval.metrics=[sw]"]
    full = make_cfg(*common, f"paths.output_dir={tmp_path}/full")
    train(full)
    cut = make_cfg(
        *common,
        f"paths.output_dir={tmp_path}/cut",
        f"+callbacks.interrupt={{_target_: tests.test_resume.CtrlCAt, at: {at}}}",
    )
    try:
        # Ctrl-C mid-step: the batch finishes, last.ckpt is written at its end, training stops.
        with pytest.raises(Interrupted, match="resume with ckpt_path="):
            train(cut)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    last = tmp_path / "cut/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["diffft_batches_done"] == at
    resumed = make_cfg(*common, f"paths.output_dir={tmp_path}/resumed", f"ckpt_path={last}")
    train(resumed)
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    _compare(a, b)


# Checkpoints after batch 2 (ModelCheckpoint counts optimiser steps: SFT-PG takes one per
# critic batch, for the critic and the baseline, and one per generator step).
NAN_CASES = {
    "ddpm": ("swiss_roll_ddpm", "chain.eps_net", "denoising", []),
    "sft_pg": (
        "swiss_roll_sft_pg",
        "critic",
        "critic",
        [
            "callbacks.model_checkpoint.every_n_epochs=null",
            "callbacks.model_checkpoint.every_n_train_steps=2",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(case, make_cfg):
    experiment, part, name, extra = NAN_CASES[case]
    cfg = make_cfg(
        *extra,
        f"experiment={experiment}",
        "debug=fast",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
        "eval.compare=null",
        "eval.solvers=null",
        f"+callbacks.poison={{_target_: tests.test_resume.PoisonAt, at: 2, part: {part}}}",
    )
    with pytest.raises(NonFiniteLossError, match=f"step 3: non-finite {name}"):
        train(cfg)
    # last.ckpt is the state after batch 2, finite.
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    method = load_method(str(last))
    assert method.batches_done == 2
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_unwritable_output_dir_fails_before_training(make_cfg, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = make_cfg(
        "experiment=swiss_roll_sft_pg", "debug=fast", f"paths.output_dir={tmp_path}/a_file/out"
    )
    with pytest.raises(ValueError, match="paths.output_dir=.*is not writable"):
        train(cfg)
    assert not (Path(cfg.paths.cache_dir) / "pretrain").exists()  # nothing trained


def test_a_damaged_or_foreign_ckpt_path_fails_before_anything_trains(make_cfg, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "plain.ckpt")
    whole = (tmp_path / "plain.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    # What diffft.train writes, as far as the check reads it: the method's class.
    for cls in ("sft_pg.SFTPG", "ddpm.DDPM"):
        torch.save({"diffft_method": f"diffft.methods.{cls}"}, tmp_path / f"{cls}.ckpt")
    unreadable = r"is not a readable checkpoint \(truncated or not a torch file\): "
    cases = [
        ("swiss_roll_sft_pg", "truncated.ckpt", unreadable),
        ("swiss_roll_sft_pg", "notes.ckpt", unreadable),
        ("swiss_roll_sft_pg", "plain.ckpt", r"was not written by diffft.train"),
        (
            "swiss_roll_ddpm",
            "sft_pg.SFTPG.ckpt",
            r"holds a diffft.methods.sft_pg.SFTPG checkpoint, but this run's method is "
            r"diffft.methods.ddpm.DDPM",
        ),
        (
            "swiss_roll_sft_pg",
            "ddpm.DDPM.ckpt",
            r"holds a diffft.methods.ddpm.DDPM checkpoint, but this run's method is "
            r"diffft.methods.sft_pg.SFTPG",
        ),
    ]
    for experiment, name, match in cases:
        path = str(tmp_path / name)
        cfg = make_cfg(f"experiment={experiment}", "debug=fast", f"ckpt_path={path}")
        with pytest.raises(ValueError, match=rf"^ckpt_path='{re.escape(path)}' {match}"):
            train(cfg)
        assert not (Path(cfg.paths.cache_dir) / "pretrain").exists()  # no stage trained
        assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="ckpt_path='/nope.ckpt': no such file"):
        train(make_cfg("experiment=swiss_roll_ddpm", "debug=fast", "ckpt_path=/nope.ckpt"))

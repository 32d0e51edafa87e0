"""Compose-and-run tests for the real configs, and short end-to-end DDPM runs."""

import copy
import csv
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from diffft.report.stages import compare_stages
from diffft.train import train

# From the installed package (conf/ is installed as diffft.conf), as `python -m diffft.train`
# sees it.
# Image experiments train T = 1000 models: the test shortens the chain (it checks the wiring).
_SMALL_IMAGE_EVAL = ["threads=1"]  # eval keys stay debug=fast's: the cached stage rows match
EXTRA = {
    "digits_ddpm": ["method.schedule.steps=20", *_SMALL_IMAGE_EVAL],
    "digits_sft_pg": ["ddpm_steps=20", *_SMALL_IMAGE_EVAL],
    "digits_dxmi": ["ddpm_steps=20", *_SMALL_IMAGE_EVAL],
    # The CIFAR-10 setups on the digits (no CIFAR-10 or released weights here): the wiring.
    **{
        f"cifar10_{m}": [
            "dataset=digits",
            "backbone=unet",
            "requires.weights=null",  # (the digits' own pretrain stage stands in)
            "eval.features=offline",
            "eval.every_n_batches=2",
            "pretrain.overrides=['experiment=cifar10_ddpm','trainer.max_steps=0',"
            "'method.schedule.steps=20','method.eval_steps=[]','eval.every_n_batches=0',"
            "'callbacks.model_checkpoint.monitor=null']",
            *_SMALL_IMAGE_EVAL,
        ]
        for m in ("sft_pg", "dxmi")
    },
    "cifar10_ddpm": [
        "dataset=digits",
        "backbone=unet",
        "method.schedule.steps=20",
        "method.eval_steps=[]",
        *_SMALL_IMAGE_EVAL,
    ],
    "digits_contrastive": ["ddpm_steps=20", "method.train_steps=4", *_SMALL_IMAGE_EVAL],
    "mnist_ddpm_full": [
        "method.schedule.steps=20",
        # one of its six short-chain rows: the released chain's keys (the others are alike)
        "method.eval_steps=[{steps: 4, subsample: fastdpm_var, spacing: quadratic, "
        "variance: posterior, sigma_last: 0.001}]",
        *_SMALL_IMAGE_EVAL,
    ],
    **{f"mnist_{m}": [*_SMALL_IMAGE_EVAL] for m in ("ddpm", "sft_pg", "dxmi")},
}
EXPERIMENTS = sorted(
    p.name.removesuffix(".yaml")
    for p in (resources.files("diffft.conf") / "experiment").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs(experiment, make_cfg):
    cfg = make_cfg(f"experiment={experiment}", "debug=fast", *EXTRA.get(experiment, []))
    rows = train(cfg)
    out = Path(cfg.paths.output_dir)
    if experiment.endswith("encoder"):  # no sampler: a checkpoint and a note, no table or plot
        assert rows == {} and "no sampler rows" in (out / "summary.md").read_text()
        assert (out / "checkpoints/last.ckpt").is_file() and not (out / "samples.png").exists()
        return
    assert "data floor" in rows and len(rows) >= 2
    if experiment.startswith("mnist_"):  # a user's array of real-MNIST-sized samples
        from diffft.sample import sample_checkpoint

        x = sample_checkpoint(str(out / "checkpoints/last.ckpt"), n=6)
        assert x.shape == (6, 1, 14, 14) and x.dtype == "float32"
        assert -1 <= x.min() and x.max() <= 1
    for name in (
        "config.yaml",
        "summary.md",
        "samples.png",
        "metrics.csv",
        "checkpoints/last.ckpt",
    ):
        assert (out / name).is_file(), name
    floor = rows["data floor"]
    assert all(len(v) == cfg.eval.floor_draws != cfg.eval.draws for v in floor.values())
    # Extra rows of cached stages carry the numbers of the stage's own summary (it evaluated
    # with this run's settings).
    pretrain = Path(cfg.paths.cache_dir, "pretrain")
    summaries = [json.loads(p.read_text()) for p in pretrain.glob("*/summary.json")]
    # (an encoder stage's summary has no rows)
    stage_rows = [next(v for k, v in s.items() if k != "data floor") for s in summaries if s]
    for name, _ in compare_stages(cfg).values():
        assert rows[name] in stage_rows, name


def test_short_ddpm_run_lowers_the_metric(make_cfg):
    common = [
        "experiment=swiss_roll_ddpm",
        "eval.n=2000",
        "eval.draws=2",
        "eval.metrics=[sw]",
        "eval.every_n_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "method.ema_decay=0.99",
    ]
    before = train(make_cfg(*common, "trainer.max_steps=1"))
    after = train(make_cfg(*common, "trainer.max_steps=1500"))
    b, a, floor = before["DDPM T=10"]["sw"], after["DDPM T=10"]["sw"], after["data floor"]["sw"]
    assert max(a) < 0.7 * min(b), (a, b)
    assert min(a) > max(floor)  # T=10 with this schedule cannot reach the floor


def test_resume_continues_step_count_and_writes_summary(make_cfg, tmp_path):
    common = ["experiment=swiss_roll_ddpm", "debug=fast", "eval.every_n_batches=5"]
    # Checkpoints every 7 steps: last.ckpt must still hold the end of training (step 10).
    cfg = make_cfg(
        *common, "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=7"
    )
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 10
    # Loss rows follow the trainer.log_every_n_steps grid (every 4th batch); the periodic
    # evaluations (every 5th) reach metrics.csv off that grid too.
    logged = make_cfg(
        *common,
        "trainer.max_steps=12",
        "trainer.log_every_n_steps=4",
        f"paths.output_dir={tmp_path}/log",
    )
    train(logged)
    rows = list(csv.DictReader((Path(logged.paths.output_dir) / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["3", "7", "11"]
    assert [r["time/batches"] for r in rows if r.get("eval/sw_paper")] == ["5.0", "10.0"]
    resumed = make_cfg(
        *common, "trainer.max_steps=20", f"ckpt_path={last}", f"paths.output_dir={tmp_path}/resumed"
    )
    train(resumed)
    ckpt = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20
    summary = json.loads((tmp_path / "resumed/summary.json").read_text())
    assert "DDPM T=10" in summary


def test_unknown_metric_and_missing_points_file_fail_clearly(make_cfg):
    with pytest.raises(ValueError, match="eval.metrics: unknown \\['fjd'\\]"):
        train(make_cfg("debug=fast", "eval.metrics=[fjd]"))
    with pytest.raises(ValueError, match=r"eval.metrics: \['fid'\] score images \[C, H, W\]"):
        train(make_cfg("debug=fast", "eval.metrics=[fid]"))
    from diffft.data.toy import DataError

    with pytest.raises(DataError, match="dataset.path: no such file '/nope.npy'"):
        train(make_cfg("debug=fast", "dataset=points_file", "dataset.path=/nope.npy"))


def test_sample_cli_writes_plain_array(make_cfg, tmp_path):
    from diffft.sample import sample_checkpoint

    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast")
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    x = sample_checkpoint(ckpt, n=50)
    assert x.shape == (50, 2) and x.dtype == "float32"
    short = sample_checkpoint(ckpt, n=50, steps=4, subsample="uniform")
    assert short.shape == (50, 2) and not (short == x).all()
    with pytest.raises(FileNotFoundError, match="ckpt: no such file"):
        sample_checkpoint(str(tmp_path / "missing.ckpt"), n=5)


def test_cosine_lr_schedule_decays_to_zero_and_bad_name_fails(make_cfg, tmp_path):
    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast", "trainer.max_steps=8")
    assert cfg.method.lr_schedule == "cosine"
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt", weights_only=False)
    (sched,) = ckpt["lr_schedulers"]
    assert sched["T_max"] == 8 and sched["_last_lr"][0] < 1e-6 * cfg.method.optimizer.lr
    resumed = make_cfg(
        "experiment=swiss_roll_ddpm",
        "debug=fast",
        "trainer.max_steps=12",
        f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints/last.ckpt'}",
        f"paths.output_dir={tmp_path}/longer",
    )
    with pytest.warns(UserWarning, match="decays over 8 steps but this run has 12"):
        train(resumed)
    with pytest.raises(Exception, match="method.lr_schedule='linear'"):
        train(make_cfg("debug=fast", "method.lr_schedule=linear"))


def test_parallel_runs_train_a_cached_stage_once(make_cfg, monkeypatch):
    import diffft.report.stages as stages

    cfg = make_cfg("experiment=swiss_roll_sft_pg", "debug=fast")
    calls = []

    def slow_fake_train(pre):
        calls.append(pre.paths.output_dir)
        time.sleep(0.5)  # the second run arrives while the first is still training
        ckpt = Path(pre.paths.output_dir) / "checkpoints/last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_text("weights")

    # Compose once here: Hydra's global state is not meant to be used from two threads.
    overrides = [*cfg.pretrain.overrides, "debug=fast", "paths.output_dir=unset"]
    stage_cfg = stages.compose("train", overrides=overrides)
    monkeypatch.setattr(stages, "compose", lambda **kw: copy.deepcopy(stage_cfg))
    with ThreadPoolExecutor(2) as pool:
        stage = lambda _: stages.cached_stage(  # noqa: E731
            cfg, list(cfg.pretrain.overrides), train=slow_fake_train
        )
        paths = list(pool.map(stage, range(2)))
    assert len(calls) == 1 and paths[0] == paths[1]


def test_compare_stages_train_in_the_background(make_cfg, tmp_path):
    common = ["experiment=swiss_roll_sft_pg_fast", "debug=fast", "eval.compare_in_background=true"]
    cfg = make_cfg(*common)
    rows = train(cfg)
    out = Path(cfg.paths.output_dir)
    ((name, _),) = compare_stages(cfg).values()
    assert name in rows and all(len(v) == cfg.eval.draws for v in rows[name].values())
    # The background process ended well: it trained the stage, or reused it if this run got
    # to the stage lock first; either way it printed the stage's checkpoint.
    ckpt = (out / "compare_stage_0.log").read_text().strip().splitlines()[-1]
    assert ckpt.endswith("last.ckpt") and (Path(ckpt).parents[1] / "done").is_file()
    # Once the stage is cached, no background process is started for it.
    again = make_cfg(*common, f"paths.output_dir={tmp_path}/again")
    assert name in train(again)
    assert not (tmp_path / "again/compare_stage_0.log").exists()


def test_a_cifar10_fine_tuning_run_without_the_released_weights_says_which_key(make_cfg):
    cfg = make_cfg("experiment=cifar10_sft_pg", "debug=fast")
    with pytest.raises(ValueError, match=r"backbone.pytorch_diffusion=\.\.\. or backbone.path="):
        train(cfg)


def test_the_best_checkpoint_is_a_row_of_its_own(make_cfg):
    cfg = make_cfg(
        "experiment=swiss_roll_ddpm",
        "debug=fast",
        "trainer.max_steps=5",
        "eval.best_row=true",
        "eval.metrics=[sw]",
        "eval.monitor=sw",
        "eval.compare=null",
    )
    rows = train(cfg)
    best = [name for name in rows if "best.ckpt" in name]
    assert len(best) == 1 and "best periodic sw, batch" in best[0]
    batch = int(best[0].rsplit("batch ", 1)[1].rstrip(")"))
    assert batch in (2, 4)  # a periodic evaluation's step, not the last (5)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints/best.ckpt", weights_only=False)
    assert ckpt["diffft_batches_done"] == batch


@pytest.mark.parametrize(
    "experiment,steps,expected",
    [  # (trainer.max_steps counts optimiser steps: DxMI takes 3 per batch)
        ("digits_sft_pg", 10, ["diag/pg_grad_cosine", "diag/sampler_grad_norm"]),
        ("digits_dxmi", 30, [f"sigma/k{k}" for k in range(1, 5)] + ["diag/sampler_grad_norm"]),
    ],
)
def test_training_diagnostics_reach_metrics_csv(make_cfg, experiment, steps, expected):
    cfg = make_cfg(
        f"experiment={experiment}",
        "debug=fast",
        "ddpm_steps=20",
        "threads=1",
        "++method.sampler.steps=4",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=5",
        "eval.compare=null",
        "eval.solvers=null",
        "eval.best_row=false",
    )
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open()))
    for key in ["diag/f_fake_sd", "diag/sample_var_ratio", *expected]:
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(v == v for v in values), key  # logged, and not NaN
    cosines = [float(r["diag/pg_grad_cosine"]) for r in rows if r.get("diag/pg_grad_cosine")]
    assert all(-1 <= c <= 1 for c in cosines)
    assert (Path(cfg.paths.output_dir) / "training.png").is_file()  # the curves, plotted


@pytest.mark.parametrize(
    "override",
    [
        "eval.n=0",
        "eval.n=-5",
        "eval.draws=0",
        "eval.draws=-1",
        "eval.periodic_n=0",
        "eval.periodic_n=-200",
        "eval.floor_draws=-1",
        "eval.w2_points=0",
        "eval.batch_size=-10",
    ],
)
def test_a_non_positive_eval_size_fails_before_training_and_names_its_key(make_cfg, override):
    key, value = override.split("=")
    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast", override)
    with pytest.raises(ValueError, match=rf"^{key}={value}: expected an int >= 1"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # nothing trained


def test_a_one_column_points_file_trains_and_plots_histograms(make_cfg, tmp_path):
    x = np.random.default_rng(0).normal(size=(500, 1))
    np.save(tmp_path / "line.npy", np.concatenate([x[:250] - 2, x[250:] + 2]))
    cfg = make_cfg(
        "experiment=swiss_roll_ddpm",
        "debug=fast",
        "dataset=points_file",
        f"dataset.path={tmp_path}/line.npy",
        "eval.periodic_plots=true",  # the periodic plots go through the same datamodule.plot
    )
    rows = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert "DDPM T=10" in rows and cfg.dataset.event_shape == [1]
    assert (out / "samples.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "plots").glob("step_*.png"))  # periodic plots too


def test_sample_refuses_a_non_positive_n(make_cfg, tmp_path):
    from diffft.sample import sample_checkpoint

    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast", "eval.every_n_batches=0")
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    for n in (0, -3):
        with pytest.raises(ValueError, match=rf"^n={n}: expected an int >= 1"):
            sample_checkpoint(ckpt, n=n)


def test_a_damaged_or_foreign_file_is_one_clear_error_when_loaded(tmp_path):
    from diffft.methods.base import load_method
    from diffft.sample import sample_checkpoint

    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "plain.ckpt")
    whole = (tmp_path / "plain.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    for name in ("truncated.ckpt", "notes.ckpt"):
        path = str(tmp_path / name)
        match = rf"^ckpt='{re.escape(path)}' is not a readable checkpoint \(truncated or not a"
        with pytest.raises(ValueError, match=match):
            load_method(path)
        with pytest.raises(ValueError, match=match):
            sample_checkpoint(path, n=5)
    path = str(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=rf"^ckpt='{re.escape(path)}' was not written by"):
        load_method(path)

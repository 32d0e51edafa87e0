"""Speed of diffft on the SFT-PG swiss-roll DDPM setup, one CPU thread (``make bench``).

1. ``step``: ms per training step of diffft's real Lightning path (config composed as in
   ``tests/conftest.py``, trainer from ``diffft.train.build_trainer``) against a bare PyTorch loop
   with the same model, loss, optimiser, grad clip, EMA and in-memory index-slice batches.
2. ``quality``: wall time of ``diffft.train.train`` from the start of fit to the first periodic
   evaluation with ``sw_paper <= 8.5``, against the released SFT-PG code (0.28 s/epoch x 2000).

Runs alternate (bare, diffft, bare, ...) so that load from other work hits both alike; each
number is the median of the repeats, with the min-max spread beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import diffft.train as dtrain
from diffft.callbacks.evaluation import PeriodicEvaluation
from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.schedules import alpha_bar, beta_schedule
from diffft.evaluation import Evaluator

REFERENCE_S = 0.28 * 2000  # released SFT-PG pretraining: 0.28 s/epoch x 2000 epochs, 1 thread
SW_TARGET = 8.5  # the reference ends at sw_paper 8.1-8.3
EVERY = 500  # periodic evaluation interval (batches)
RESULTS = Path(__file__).parent / "results" / "bench.md"


def make_cfg(tmp: Path, *overrides: str) -> DictConfig:
    """The real config, composed as tests/conftest.py does (needs Hydra initialised)."""
    paths = [f"paths.output_dir={tmp}/out", f"paths.cache_dir={tmp}/cache"]
    return compose("train", overrides=[*paths, "experiment=swiss_roll_ddpm", *overrides])


class StepTimer(L.Callback):
    """Wall time per training batch of the loop only (fit set-up and teardown excluded); stops
    the run after ``stop_after`` batches when given."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.batches = stop_after, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1
        if self.batches == self.stop_after:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.ms_per_step = (time.perf_counter() - self.t0) * 1e3 / max(self.batches, 1)


def diffft_step_ms(tmp: Path, steps: int, progress_bar: bool = False) -> float:
    """ms/step of ``trainer.fit``, built as ``diffft.train.train`` builds it."""
    cfg = make_cfg(
        tmp,
        f"trainer.max_steps={steps}",
        f"trainer.enable_progress_bar={str(progress_bar).lower()}",
        "eval.every_n_batches=0",
        "~logger",
        "callbacks.model_checkpoint=null",  # (diffft's LastCheckpoint writes once, at the end)
    )
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = instantiate(method_cfg, _recursive_=False, _convert_="all")
    evaluator = Evaluator(datamodule, list(cfg.eval.metrics), n=cfg.eval.n)
    trainer = dtrain.build_trainer(cfg, evaluator)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # the bar
        trainer.fit(method, datamodule)
    return timer.ms_per_step


def bare_step_ms(tmp: Path, steps: int) -> float:
    """ms/step of a plain PyTorch loop with the same model, loss, optimiser (and learning-rate
    schedule), clip and EMA."""
    cfg = make_cfg(tmp)
    m, data_cfg = cfg.method, cfg.dataset
    torch.manual_seed(cfg.seed)
    data = instantiate(data_cfg)
    data.setup("fit")
    x, n, batch = data.train, data.train.shape[0], data_cfg.batch_size
    ab = alpha_bar(beta_schedule(**m.schedule)).float()
    shape = list(data.event_shape)
    net = instantiate(cfg.backbone, event_shape=shape, n_steps=m.schedule.steps)  # diffft TimeMLP
    ema = copy.deepcopy(net).requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    opt = instantiate(m.optimizer, params=params)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        if m.lr_schedule == "cosine"
        else None
    )
    g = torch.Generator().manual_seed(data_cfg.seed)
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            loss = denoising_loss(net, x[perm[i : i + batch]], ab, antithetic=m.antithetic)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, m.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - m.ema_decay)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - t0) * 1e3 / steps


class StopAtQuality(L.Callback):
    """Stops fit at the first periodic evaluation with ``eval/sw_paper <= target``; runs after
    ``PeriodicEvaluation`` (appended later), so it sees that batch's evaluation."""

    def __init__(self, target: float, every: int) -> None:
        self.target, self.every, self.t0, self.eval_s, self.step = target, every, 0.0, 0.0, 0
        self.seen: list[tuple[int, float]] = []
        self.elapsed: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        for cb in trainer.callbacks:  # also time the periodic evaluations themselves
            if isinstance(cb, PeriodicEvaluation):
                cb.evaluator.evaluate = self._timed(cb.evaluator.evaluate)
                self.periodic = cb
        self.t0 = time.perf_counter()

    def _timed(self, f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = f(*args, **kwargs)
            self.eval_s += time.perf_counter() - t
            return out

        return timed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        batches = self.periodic.batches  # training batches so far (SFT-PG: critic iterations)
        if batches % self.every or self.elapsed is not None:
            return
        sw = float(trainer.callback_metrics["eval/sw_paper"])
        self.seen.append((batches, sw))
        if sw <= self.target:
            self.elapsed, self.step = time.perf_counter() - self.t0, batches
            trainer.should_stop = True


def time_to_quality(tmp: Path, max_steps: int | None) -> tuple[StopAtQuality, dict, float]:
    """Runs ``diffft.train.train`` itself, its trainer built with ``StopAtQuality`` appended."""
    cfg = make_cfg(
        tmp,
        f"eval.every_n_batches={EVERY}",
        "eval.periodic_n=10000",
        "eval.metrics=[sw_paper]",
        "trainer.enable_progress_bar=false",
        *([f"trainer.max_steps={max_steps}"] if max_steps else []),
    )
    stop, build = StopAtQuality(SW_TARGET, EVERY), dtrain.build_trainer

    def build_with_stop(cfg: DictConfig, evaluator: Evaluator) -> L.Trainer:
        trainer = build(cfg, evaluator)
        trainer.callbacks.append(stop)
        return trainer

    dtrain.build_trainer = build_with_stop
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rows = dtrain.train(cfg)
    finally:
        dtrain.build_trainer = build
    return stop, rows, time.perf_counter() - t0


def bench_step(tmp: Path, steps: int, repeats: int, bar: bool) -> list[str]:
    runs: dict[str, list[float]] = {"bare": [], "diffft": [], "diffft+bar": []}
    for _ in range(repeats):  # interleaved: background load hits every variant alike
        runs["bare"].append(bare_step_ms(tmp, steps))
        runs["diffft"].append(diffft_step_ms(tmp, steps))
        if bar:
            runs["diffft+bar"].append(diffft_step_ms(tmp, steps, progress_bar=True))
    bare = statistics.median(runs["bare"])
    lines = [f"Per-step time, {steps} steps x {repeats} interleaved repeats (median, min-max):", ""]
    lines.append(f"  {'loop':<12} {'ms/step':>8}  {'spread':>13}  {'ratio':>5}  per-repeat ratios")
    for name, xs in runs.items():
        if xs:
            med, spread = statistics.median(xs), f"{min(xs):.3f}-{max(xs):.3f}"
            each = " ".join(f"{b / x:.2f}" for b, x in zip(runs["bare"], xs, strict=True))
            lines.append(f"  {name:<12} {med:8.3f}  {spread:>13}  {bare / med:5.2f}  {each}")
    lines += ["", "  ratio = bare ms / this ms (1.0 = as fast as the bare loop)"]
    if bar:
        lines.append("  diffft+bar: default TQDM progress bar, written to /dev/null")
    lines.append("")
    for name, label in (("diffft", ""), ("diffft+bar", " (progress bar on)")):
        if runs[name]:
            med = statistics.median(runs[name])
            lines.append(
                f"DDPM step{label}: bare {bare:.2f} ms, diffft {med:.2f} ms, "
                f"ratio {bare / med:.2f} (target >= 0.9)"
            )
    return lines


def bench_quality(tmp: Path, max_steps: int | None) -> list[str]:
    stop, rows, total = time_to_quality(tmp, max_steps)
    evals = ", ".join(f"{s}: {v:.2f}" for s, v in stop.seen)
    lines = [
        f"Time to sw_paper <= {SW_TARGET} (diffft.train.train; the periodic evaluation samples",
        f"10K points (1 draw) from the EMA chain every {EVERY} batches):",
        "",
        textwrap.fill(evals, 96, initial_indent="  sw_paper by step: ", subsequent_indent=" " * 4),
    ]
    if stop.elapsed is None:
        cap = f" (--quick caps the run at {max_steps} steps)" if max_steps else ""
        return [*lines, f"  NOT reached{cap}; {total:.1f} s in train() overall"]
    final = rows.get(next(iter(rows)), {}).get("sw_paper", [0.0])
    sd = statistics.stdev(final) if len(final) > 1 else 0.0
    lines += [
        f"  {'reached at batch':<36} {stop.step}",
        f"  {'wall time from the start of fit':<36} {stop.elapsed:6.1f} s  "
        f"(of which periodic evaluation {stop.eval_s:.1f} s)",
        f"  {'train() overall':<36} {total:6.1f} s  (incl. set-up and the final evaluation)",
        f"  {'final evaluation at stop':<36} {statistics.mean(final):6.2f} ± {sd:.2f}  "
        f"({len(final)} draws of 10K)",
        f"  {'reference (released SFT-PG code)':<36} {REFERENCE_S:6.1f} s  "
        "(0.28 s/epoch x 2000 epochs, sw_paper 8.1-8.3)",
        "",
        f"Quality: diffft {stop.elapsed:.1f} s, reference {REFERENCE_S:.0f} s, "
        f"speed-up {REFERENCE_S / stop.elapsed:.1f}x (target >= 5x)",
    ]
    return lines


# -- SFT-PG -------------------------------------------------------------------------------------
SFT_PAPER = "swiss_roll_sft_pg"  # the per-iteration comparison: the paper's toy settings
SFT_E2E = "swiss_roll_sft_pg_fast"  # the end-to-end run: `make run`'s experiment
# Released code on this machine class (specs): pretraining 0.28 s/epoch x 2000 epochs, then
# fine-tuning 0.083 s per critic iteration x 79 iterations/epoch x 300 epochs.
SFT_REFERENCE_S = 0.28 * 2000 + 0.083 * 79 * 300
# Its sw_paper is 0.86 ± 0.09 after 200 epochs (specs), still above floor mean + sd (~0.75), so
# its time to the floor lies between the 200- and the 300-epoch cost: the lower bound is the
# conservative reference.
SFT_REFERENCE_LOW_S = 0.28 * 2000 + 0.083 * 79 * 200
SFT_EVERY = 790  # periodic evaluation interval of the end-to-end run (10 epochs)


def sft_pg_method(
    tmp: Path, *overrides: str, experiment: str | None = None
) -> tuple[DictConfig, Any]:
    """A fine-tuning module (SFT-PG by default) on an untrained DDPM of the experiment's
    pretrain stage (timing only)."""
    cfg = compose(
        "train",
        overrides=[
            f"paths.output_dir={tmp}/out",
            f"experiment={experiment or SFT_PAPER}",
            *overrides,
        ],
    )
    pre = compose("train", overrides=list(cfg.pretrain.overrides))
    for c in (cfg, pre):
        dtrain.resolve_data(c)  # dataset.event_shape, which the networks are built for
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method_cfg["ddpm"] = OmegaConf.to_container(pre.method, resolve=True)
    method_cfg["ddpm"].pop("_target_")
    return cfg, instantiate(method_cfg, _recursive_=False, _convert_="all")


def diffft_sft_pg_ms(tmp: Path, iters: int, experiment: str | None = None) -> float:
    """ms per iteration (one Lightning batch) of a fine-tuning method (SFT-PG's critic
    iteration by default) under diffft's trainer."""
    cfg, method = sft_pg_method(
        tmp,
        "trainer.enable_progress_bar=false",
        "eval.every_n_batches=0",
        "~logger",
        "callbacks.model_checkpoint=null",
        experiment=experiment,
    )
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    trainer = dtrain.build_trainer(cfg, Evaluator(datamodule, [cfg.eval.metrics[0]]))
    timer = StepTimer(stop_after=iters)
    trainer.callbacks.append(timer)
    trainer.fit(method, datamodule)
    return timer.ms_per_step


def bare_sft_pg_ms(tmp: Path, iters: int) -> float:
    """ms per critic iteration of Alg. 1 as a plain PyTorch loop: the same chain, critic,
    baseline, Adam optimisers, buffer and one 128-transition generator step every n_critic."""
    cfg, method = sft_pg_method(tmp)
    hp, data_cfg = cfg.method, cfg.dataset
    torch.manual_seed(cfg.seed)
    data = instantiate(data_cfg)
    data.setup("fit")
    x, n, batch = data.train, data.train.shape[0], data_cfg.batch_size
    chain, critic, baseline = method.chain, method.critic, method.baseline
    opt_g = torch.optim.Adam(chain.parameters(), lr=hp.lr.generator)
    opt_f = torch.optim.Adam(critic.parameters(), lr=hp.lr.critic)
    opt_b = torch.optim.Adam(baseline.parameters(), lr=hp.lr.baseline)
    g = torch.Generator().manual_seed(data_cfg.seed)
    buffer: list[torch.Tensor] = []
    done = 0
    t0 = time.perf_counter()
    while done < iters:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            real = x[perm[i : i + batch]]
            traj = chain.sample(hp.rollout_batch, return_trajectory=True)
            f_fake = critic(traj.sample).squeeze(-1)
            x_k, _, k = traj.transitions()
            values = baseline(x_k, k - 1).squeeze(-1)
            loss = critic(real).mean() - f_fake.mean()
            loss = loss + (values - f_fake.repeat(traj.steps)).square().mean()
            opt_f.zero_grad(set_to_none=True)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            opt_f.step()
            opt_b.step()
            buffer.append(traj.states)
            done += 1
            if done % hp.n_critic == 0:
                states = torch.cat(buffer, dim=1)
                buffer.clear()
                x_k, x_prev, k = type(traj)(states).transitions()
                x_0 = states[0].repeat(traj.steps, 1)
                idx = torch.randperm(x_k.shape[0])[: hp.generator_batch]
                with torch.no_grad():
                    adv = critic(x_0[idx]).squeeze(-1) - baseline(x_k[idx], k[idx] - 1).squeeze(-1)
                loss = (adv * chain.log_prob(x_prev[idx], x_k[idx], k[idx])).mean()
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
            if done == iters:
                break
    return (time.perf_counter() - t0) * 1e3 / iters


def interleaved(
    bare_fn: Callable[[], float], ours_fn: Callable[[], float], repeats: int
) -> tuple[dict[str, list[float]], float, float, str]:
    """``repeats`` alternating runs of a bare loop and diffft: the runs, both medians and the
    per-repeat ratios."""
    runs: dict[str, list[float]] = {"bare": [], "diffft": []}
    for _ in range(repeats):
        runs["bare"].append(bare_fn())
        runs["diffft"].append(ours_fn())
    bare, ours = statistics.median(runs["bare"]), statistics.median(runs["diffft"])
    each = " ".join(f"{b / d:.2f}" for b, d in zip(runs["bare"], runs["diffft"], strict=True))
    return runs, bare, ours, each


def bench_sft_pg_step(tmp: Path, iters: int, repeats: int) -> list[str]:
    runs, bare, ours, each = interleaved(
        lambda: bare_sft_pg_ms(tmp, iters), lambda: diffft_sft_pg_ms(tmp, iters), repeats
    )
    return [
        f"SFT-PG critic iteration (experiment={SFT_PAPER}, {iters} iterations x {repeats} "
        "interleaved repeats, median):",
        "",
        f"  bare {bare:.2f} ms ({min(runs['bare']):.2f}-{max(runs['bare']):.2f}), "
        f"diffft {ours:.2f} ms ({min(runs['diffft']):.2f}-{max(runs['diffft']):.2f}); "
        f"per-repeat ratios {each}",
        "  released code (specs): 83 ms",
        "",
        f"SFT-PG iteration: bare {bare:.2f} ms, diffft {ours:.2f} ms, ratio {bare / ours:.2f} "
        f"(target >= 0.9); {83 / ours:.1f}x faster than the released code",
    ]


DXMI = "eight_gaussians_dxmi"


def bare_dxmi_ms(tmp: Path, iters: int) -> float:
    """ms per iteration of DxMI's Alg. 1 as a plain PyTorch loop: the same chain, value, energy
    network (V_0), Adam optimisers and cosine learning rate; rollout, AVR, energy step, one
    joint TD step and one reparameterised sampler step."""
    cfg, method = sft_pg_method(tmp, experiment=DXMI)
    hp, data_cfg = cfg.method, cfg.dataset
    torch.manual_seed(cfg.seed)
    data = instantiate(data_cfg)
    data.setup("fit")
    x, n, batch = data.train, data.train.shape[0], data_cfg.batch_size
    chain, value, energy = method.chain, method.value, method.energy
    foreach = bool(hp.optimizer.get("foreach", False))  # the same Adam as the method's

    def adam(params: Any, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=lr, foreach=foreach)

    opts = {
        "sampler": adam(chain.eps_net.parameters(), hp.lr.sampler),
        "sigma": adam([chain.log_sigma], hp.lr.sigma),
        "value": adam(value.parameters(), hp.lr.value),
        "energy": adam(energy.parameters(), hp.lr.energy),
    }
    base = {k: o.param_groups[0]["lr"] for k, o in opts.items()}
    s2 = chain.fixed_sigma.square().clone()
    K, D, tau, total = chain.steps, 2, hp.tau, iters
    g = torch.Generator().manual_seed(data_cfg.seed)

    def V(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # V_0 = the energy network
        last = k == 0
        if bool(last.all()):
            return energy(z).view(-1)
        if not bool(last.any()):
            return value(z, k - 1).view(-1)
        i0, i1 = last.nonzero().view(-1), (~last).nonzero().view(-1)
        vals = torch.cat([energy(z[i0]).view(-1), value(z[i1], k[i1] - 1).view(-1)])
        return vals[torch.argsort(torch.cat([i0, i1]))]

    def step(names: tuple[str, ...], loss: torch.Tensor) -> None:
        for name in names:
            opts[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            opts[name].step()

    done = 0
    t0 = time.perf_counter()
    while done < iters:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            f = 0.5 * (1 + math.cos(math.pi * done / total))
            for name, o in opts.items():
                o.param_groups[0]["lr"] = base[name] * f
            real = x[perm[i : i + batch]]
            traj = chain.sample(
                hp.rollout_batch, generator=g, return_trajectory=True, return_noise=True
            )
            x_k, x_prev, k = traj.transitions()
            sq = (x_k - x_prev).square().sum(1)
            with torch.no_grad():
                s2[1:] = 0.99 * s2[1:] + 0.01 * sq.view(K, -1).mean(1) / D
            zero = torch.zeros(batch, dtype=torch.long)
            e_r, e_f = V(real, zero[: real.shape[0]]), V(traj.sample, zero)
            loss = e_r.mean() - e_f.mean() + (e_r.square().mean() + e_f.square().mean())
            step(("energy",), loss)
            with torch.no_grad():
                log_pi = chain.log_prob_of_noise(traj.transition_noise(), k)
                cost = tau * log_pi + tau * sq / (2 * s2[k])
                target = V(x_prev, k - 1) + cost
            step(("value",), (target - V(x_k, k)).square().mean())
            idx = torch.randperm(x_k.shape[0], generator=g)[: hp.sampler_batch]
            xs, ks = x_k[idx], k[idx]
            new = chain.step(xs, ks, torch.randn(xs.shape, generator=g))
            loss = V(new, ks - 1) - tau * D * chain.log_sigma[ks]
            loss = (loss + tau * (xs - new).square().sum(1) / (2 * s2[ks])).mean()
            step(("sampler", "sigma"), loss)
            done += 1
            if done == iters:
                break
    return (time.perf_counter() - t0) * 1e3 / iters


def bench_dxmi_step(tmp: Path, iters: int, repeats: int) -> list[str]:
    runs, bare, ours, each = interleaved(
        lambda: bare_dxmi_ms(tmp, iters), lambda: diffft_sft_pg_ms(tmp, iters, DXMI), repeats
    )
    return [
        f"DxMI iteration (experiment={DXMI}, {iters} iterations x {repeats} interleaved "
        "repeats, median):",
        "",
        f"  bare {bare:.2f} ms ({min(runs['bare']):.2f}-{max(runs['bare']):.2f}), "
        f"diffft {ours:.2f} ms ({min(runs['diffft']):.2f}-{max(runs['diffft']):.2f}); "
        f"per-repeat ratios {each}",
        "",
        f"DxMI iteration: bare {bare:.2f} ms, diffft {ours:.2f} ms, ratio {bare / ours:.2f} "
        "(target >= 0.9)",
    ]


def bench_sft_pg_e2e(tmp: Path) -> list[str]:
    """Wall time of one ``diffft.train.train`` call of ``SFT_E2E`` from an empty cache (DDPM
    pretraining + SFT-PG) until a periodic evaluation (one 10K draw) of sw_paper is within the
    floor (floor mean + one floor sd)."""
    cfg = compose(
        "train",
        overrides=[
            f"paths.output_dir={tmp}/e2e",
            f"paths.cache_dir={tmp}/e2e_cache",
            f"experiment={SFT_E2E}",
            f"eval.every_n_batches={SFT_EVERY}",
            "eval.periodic_n=10000",
            "eval.metrics=[sw_paper,sw,w2]",
            "~eval.compare",
            "trainer.enable_progress_bar=false",
        ],
    )
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    floor = Evaluator(
        datamodule,
        ["sw_paper"],
        n=cfg.eval.n,
        draws=cfg.eval.draws,
        seed=cfg.eval.seed,
        floor_draws=cfg.eval.floor_draws,
    ).floor()["sw_paper"]
    target = statistics.mean(floor) + statistics.stdev(floor)
    stop = StopAtQuality(target, SFT_EVERY)
    build, cached = dtrain.build_trainer, dtrain.cached_stage
    pre_s: list[float] = []

    def build_with_stop(cfg: DictConfig, evaluator: Evaluator) -> L.Trainer:
        trainer = build(cfg, evaluator)
        if "SFTPG" in str(cfg.method.get("_target_")):  # not the pretraining stage
            trainer.callbacks.append(stop)
        return trainer

    def timed_stage(*args: Any) -> str:
        t = time.perf_counter()
        out = cached(*args)
        pre_s.append(time.perf_counter() - t)
        return out

    dtrain.build_trainer, dtrain.cached_stage = build_with_stop, timed_stage
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rows = dtrain.train(cfg)
    finally:
        dtrain.build_trainer, dtrain.cached_stage = build, cached
    total = time.perf_counter() - t0
    evals = ", ".join(f"{s}: {v:.2f}" for s, v in stop.seen)
    lines = [
        f"SFT-PG end to end (experiment={SFT_E2E}, empty cache: DDPM pretraining + fine-tuning),",
        f"until a periodic sw_paper (one 10K draw, every {SFT_EVERY} batches = 10 epochs) <= floor "
        f"mean + sd = {target:.3f}:",
        "",
        textwrap.fill(evals, 96, initial_indent="  sw_paper by batch: ", subsequent_indent="    "),
    ]
    if stop.elapsed is None:
        return [*lines, f"  NOT reached within the run; {total:.1f} s in train() overall"]
    final = {m: rows[next(iter(rows))][m] for m in ("sw_paper", "sw", "w2")}
    e2e = pre_s[0] + stop.elapsed
    lines += [
        f"  {'pretraining stage (train + evaluate)':<40} {pre_s[0]:6.1f} s",
        f"  {'fine-tuning, start of fit to the floor':<40} {stop.elapsed:6.1f} s  "
        f"(of which periodic evaluation {stop.eval_s:.1f} s; batch {stop.step})",
        f"  {'train() overall':<40} {total:6.1f} s  (incl. set-up and the final evaluation)",
    ]
    for m, v in final.items():
        f = rows["data floor"][m]
        lines.append(
            f"  final {m:<10} {statistics.mean(v):.4g} ± {statistics.stdev(v):.2g} "
            f"({len(v)} draws of 10K; floor {statistics.mean(f):.4g} ± {statistics.stdev(f):.2g}, "
            f"{len(f)} draws)"
        )
    lines += [
        f"  {'reference (released code, specs)':<40} {SFT_REFERENCE_LOW_S:6.1f}-"
        f"{SFT_REFERENCE_S:.1f} s  (pretraining 560 s + fine-tuning 200-300 epochs; at 200 "
        "epochs it is still above the floor)",
        "",
        f"SFT-PG end to end: diffft {e2e:.1f} s (pretraining {pre_s[0]:.0f} s + fine-tuning "
        f"{stop.elapsed:.0f} s), reference >= {SFT_REFERENCE_LOW_S:.0f} s, speed-up >= "
        f"{SFT_REFERENCE_LOW_S / e2e:.1f}x ({SFT_REFERENCE_S / e2e:.1f}x against the full "
        "300-epoch recipe; target >= 5x, i.e. <= 9 min; stretch <= 5 min)",
    ]
    return lines


DDP_RUNS = {
    "DDPM": ["experiment=swiss_roll_ddpm", "trainer.max_steps=2100"],
    "SFT-PG": [
        "experiment=swiss_roll_sft_pg_fast",
        "trainer.max_epochs=-1",
        "trainer.max_steps=-1",
        "+trainer.max_time=00:00:01:30",  # ~1.5 min of critic iterations per run
        "pretrain.debug=fast",  # the DDPM it starts from: throughput does not need a good one
    ],
}


def bench_ddp(tmp: Path, quick: bool) -> list[str]:
    """Batches/s of ``python -m diffft.train ... hardware=ddp_cpu trainer.devices=N`` (N = 1, 2;
    Lightning's DDP on gloo, one process per rank, one thread each), timed by
    ``diffft.callbacks.throughput.Throughput`` after 100 warm-up batches. Each rank takes a full
    per-rank batch, so samples/s = batches/s x batch x ranks."""
    lines = [
        "DDP on CPU (hardware=ddp_cpu, gloo, 1 thread per rank), batches/s after 100 warm-up"
        " batches:",
        "",
        "  method   ranks  batches/s  samples/s  speed-up (samples/s vs 1 rank)",
    ]
    for name, overrides in DDP_RUNS.items():
        rates = {}
        for ranks in (1, 2):
            path = tmp / f"ddp-{name}-{ranks}.json"
            extra = ["trainer.max_steps=400"] if quick and name == "DDPM" else []
            cmd = [
                sys.executable,
                "-m",
                "diffft.train",
                *overrides,
                *extra,
                "hardware=ddp_cpu",
                f"trainer.devices={ranks}",
                "eval.every_n_batches=0",
                "callbacks.model_checkpoint.monitor=null",
                "eval.compare=null",
                "eval.solvers=null",
                "eval.n=1000",
                "eval.draws=1",
                "trainer.enable_progress_bar=false",
                f"+callbacks.throughput={{_target_: diffft.callbacks.throughput.Throughput,"
                f" path: '{path}'}}",
                f"hydra.run.dir={tmp}/ddp-{name}-{ranks}",
                f"paths.cache_dir={tmp}/cache",
            ]
            subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
            rates[ranks] = json.loads(path.read_text())
        batch = 128
        base = rates[1]["batches_per_s"] * batch
        for ranks, r in rates.items():
            samples = r["batches_per_s"] * batch * ranks
            lines.append(
                f"  {name:7}  {ranks:5}  {r['batches_per_s']:9.1f}  {samples:9.0f}"
                f"  {samples / base:5.2f}x"
            )
    lines += [
        "",
        f"  {os.cpu_count()} logical cores: two ranks share them with each other (and with the",
        "  gradient all-reduce every step), so the ideal is 2x only on two free physical cores.",
    ]
    return lines


def bench_images(tmp: Path, quick: bool) -> list[str]:
    """Digits (8x8, the 0.46M-parameter UNet, untrained weights: speed only), the threads of the
    digits experiments: samples/s of the full T = 1000 chain against the T' = 10 / 4 chains that
    fine-tuning is for, and ms (images/s of training data) per iteration of SFT-PG and DxMI."""
    cfg = compose("train", overrides=[f"paths.output_dir={tmp}/img", "experiment=digits_ddpm"])
    torch.set_num_threads(cfg.threads)
    dtrain.resolve_data(cfg)
    method = instantiate(
        OmegaConf.to_container(cfg.method, resolve=True), _recursive_=False, _convert_="all"
    ).eval()
    n = 64 if quick else 256
    chains = {"T=1000 (full chain)": method.eval_chain}
    for steps in (10, 4):
        chains[f"T'={steps} (fastdpm_var)"] = method.short_chain(steps, "fastdpm_var")
    lines = [
        f"Images: digits 8x8, UNet {sum(p.numel() for p in method.parameters()) / 1e6:.2f}M "
        f"parameters, {cfg.threads} threads, {n} samples per call:",
        "",
        "  chain                  s per call  samples/s  speed-up",
    ]
    rates = {}
    for name, chain in chains.items():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            chain.sample(8, generator=g)  # warm-up
            t = time.perf_counter()
            chain.sample(n, generator=g)
        rates[name] = n / (time.perf_counter() - t)
        full = rates["T=1000 (full chain)"]
        lines.append(
            f"  {name:22} {n / rates[name]:10.2f}  {rates[name]:9.1f}  {rates[name] / full:7.0f}x"
        )
    lines += ["", "  fine-tuning iteration (one Lightning batch of 64 training images):"]
    iters = 20 if quick else 100
    for name, experiment in (("SFT-PG", "digits_sft_pg"), ("DxMI", "digits_dxmi")):
        ms = diffft_sft_pg_ms(tmp, iters, experiment)
        lines.append(
            f"  {name:7} T'=10: {ms:8.1f} ms per iteration, {64 / ms * 1e3:7.1f} training images/s"
            f" ({iters} iterations)"
        )
    short = rates["T'=10 (fastdpm_var)"]
    lines += [
        "",
        f"Images: T'=10 samples {short / full:.0f}x faster than T=1000 "
        f"({short:.0f} vs {full:.1f} samples/s)",
    ]
    return lines


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other work; load average {load}), "
        f"torch {torch.__version__}, lightning {L.__version__}, "
        f"threads={torch.get_num_threads()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few hundred steps, one quality cap")
    parts = (
        "step", "quality", "sft_step", "sft_e2e", "dxmi_step", "ddp", "images", "memory", "all",
    )  # fmt: skip
    p.add_argument("--part", choices=parts, default="all")
    p.add_argument("--no-bar", action="store_true", help="skip the progress-bar variant")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available", tips
    warnings.filterwarnings("ignore", module="lightning")  # few-workers and pytree notices
    steps, repeats = (300, 3) if args.quick else (3000, 3)
    lines = [f"machine: {machine()}", ""]
    print(lines[0], flush=True)
    with (
        tempfile.TemporaryDirectory() as d,
        initialize_config_module("diffft.conf", version_base="1.3"),
    ):
        tmp = Path(d)
        if args.part in ("step", "all"):
            out = bench_step(tmp, steps, repeats, bar=not args.no_bar)
            print("\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("quality", "all"):
            out = bench_quality(tmp, 1000 if args.quick else None)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("sft_step", "all"):
            out = bench_sft_pg_step(tmp, 200 if args.quick else 1500, repeats)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("sft_e2e", "all") and not args.quick:
            out = bench_sft_pg_e2e(tmp)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("dxmi_step", "all"):
            out = bench_dxmi_step(tmp, 200 if args.quick else 1500, repeats)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("images", "all"):
            out = bench_images(tmp, args.quick)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("memory", "all"):
            sys.path.insert(0, str(Path(__file__).parent))
            from memory import bench_memory  # one process per measurement (peak RSS)

            out = bench_memory(threads=2)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
        if args.part in ("ddp", "all"):
            out = bench_ddp(tmp, args.quick)
            print("\n" + "\n".join(out), flush=True)
            lines += [*out, ""]
    lines += [
        f"Note: {os.cpu_count()} cores shared with other work, absolute times move with its load",
        "(up to 2x; see the load average). Ratios pair interleaved runs and are steadier.",
    ]
    command = " ".join([".venv/bin/python", "experiments/bench.py", *sys.argv[1:]])
    header = [f"# diffft benchmark ({datetime.now():%Y-%m-%d %H:%M})", "", f"command: `{command}`"]
    # bench.md holds a full run of every part; a quick run or a single part has its own file.
    part = "" if args.part == "all" else f"_{args.part}"
    name = "bench" + ("_quick" if args.quick else "") + part
    out_file = RESULTS.with_name(f"{name}.md")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join([*header, "", "```", *lines, "```", ""]))
    print(f"\nsaved to {out_file}")


if __name__ == "__main__":
    main()

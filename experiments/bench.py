"""Speed of diffft against bare PyTorch loops of the same losses (``make bench``).

The ``*step`` parts time a method's own update code: its LightningModule (``diffft.methods``),
instantiated from the composed config as ``diffft.train`` does and driven through
``training_step`` by a ``lightning.Trainer`` built from ``cfg.trainer`` (no logger, checkpoint or
periodic evaluation: they are I/O, not the update), timed per batch after a warm-up
(``StepTimer``). The reference is a bare loop calling the same loss functions
(``diffft.methods.losses``, ``denoising_loss``) on the same kind of networks and chain
(``diffft.nets``, ``diffft.diffusion``) with the same optimisers and batch sizes. ``ratio`` = bare
ms / diffft ms, diffft's rate as a share of the bare loop's (1.0: the framework costs nothing).
One thread, as the toy configs run (``threads: 1``). The weights are untrained: the time of an
update does not depend on them.

* ``step``: a DDPM step (swiss roll, TimeMLP, batch 128), also with the progress bar on.
* ``sft_step``: an SFT-PG critic iteration (swiss roll, T' = 10, MLP critic, TimeMLP baseline).
* ``dxmi_step``: a DxMI iteration (8 gaussians, T = 5, energy MLP, TimeMLP value).
* ``quality`` / ``sft_e2e``: wall time of ``diffft.train.train`` to a sw_paper target against the
  released SFT-PG code: DDPM pretraining; SFT-PG end to end from an empty cache.
* ``images``: samples/s of the digits UNet chain at T' = 10 over T = 1000.
* ``memory``: peak memory of back-propagation through the digits chain with / without per-step
  checkpointing (``experiments/memory.py``, one process per measurement).
* ``ddp``: samples/s of ``python -m diffft.train hardware=ddp_cpu`` with 2 ranks over 1.

Repeats alternate (bare, diffft, bare, ...) so that load from other work hits both alike; each
number is the median of the repeats. ``--quick`` runs every part at tiny sizes (the subprocess
parts beside the others): a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

import diffft.train as dtrain
from diffft.diffusion.chain import GaussianChain, Trajectory
from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.schedules import alpha_bar, beta_schedule, subsample
from diffft.evaluation import Evaluator
from diffft.methods import losses
from diffft.methods.costs import build_cost

RESULTS = Path(__file__).parent / "results"
# The released SFT-PG code on this machine class, one thread (specs): DDPM pretraining 0.28 s per
# epoch x 2000 epochs, then 0.083 s per critic iteration x 79 per epoch x 200-300 epochs (at 200
# its sw_paper is still above the floor: the lower bound is the conservative reference).
PRETRAIN_S, SFT_ITERATION_S = 0.28 * 2000, 0.083
SFT_REFERENCE_S = PRETRAIN_S + SFT_ITERATION_S * 79 * 200


# -- diffft's way: the method's training_step under a Lightning Trainer ---------------------------
def config(tmp: Path, *overrides: str) -> tuple[DictConfig, Any]:
    """The composed config (outputs under ``tmp``) with its data resolved as ``diffft.train``
    resolves them (``dataset.event_shape``, which the networks are built for), and the data."""
    paths = [f"paths.output_dir={tmp}/out", f"paths.cache_dir={tmp}/cache"]
    cfg = compose("train", overrides=[*paths, *overrides])
    return cfg, dtrain.resolve_data(cfg)


def build(cfg: DictConfig, init_from: str | None = None) -> L.LightningModule:
    """The configured method, instantiated as ``diffft.train`` does (seeded)."""
    L.seed_everything(cfg.seed, verbose=False)
    kwargs = {"init_from": init_from} if init_from else {}
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    return instantiate(method_cfg, _recursive_=False, _convert_="all", **kwargs)


def pretrained(tmp: Path, cfg: DictConfig) -> tuple[str, DictConfig]:
    """The DDPM of ``cfg``'s pretrain stage after one step, saved by ``trainer.save_checkpoint``
    (what a fine-tuning method's ``init_from`` reads); and the stage's config."""
    pre, dm = config(tmp, *cfg.pretrain.overrides)
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, enable_model_summary=False, **kw)
    with quiet():
        trainer.fit(build(pre), datamodule=dm)
    path = tmp / f"{pre.task_name}-{time.monotonic_ns()}.ckpt"
    trainer.save_checkpoint(path)
    return str(path), pre


class StepTimer(L.Callback):
    """ms per batch over batches ``warmup + 1 .. warmup + steps`` (the first ones hold Lightning's
    set-up and allocator warm-up), from batch end to batch end; then stops fit."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.batches, self.t0, self.ms = warmup, steps, 0, 0.0, math.nan

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            self.t0 = time.perf_counter()
        elif self.batches == self.warmup + self.steps:
            self.ms = (time.perf_counter() - self.t0) * 1e3 / self.steps
            trainer.should_stop = True


def diffft_ms(cfg: DictConfig, dm: Any, method: Any, sizes: tuple, bar: bool = False) -> float:
    """ms per batch of ``trainer.fit(method)``; ``bar``: with diffft's TQDM progress bar."""
    timer = StepTimer(*sizes[:2])
    callbacks = [timer, *([TQDMProgressBar(cfg.progress_refresh_rate)] if bar else [])]
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": bar}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, **kw)
    with quiet():
        trainer.fit(method, datamodule=dm)
    return timer.ms


# -- the bare loops: the same losses, networks, optimisers and batch sizes, nothing else ----------
def bare_ms(step: Callable[[Tensor], None], data: Tensor, batch: int, sizes: tuple) -> float:
    """ms per ``step`` of a plain loop over shuffled index-slice batches of ``data``."""
    (warmup, steps), t0 = sizes[:2], 0.0
    g = torch.Generator().manual_seed(0)
    perms = (torch.randperm(len(data), generator=g) for _ in itertools.count())
    batches = (data[p[i : i + batch]] for p in perms for i in range(0, len(data), batch))
    for i in range(warmup + steps):
        t0 = time.perf_counter() if i == warmup else t0
        step(next(batches))
    return (time.perf_counter() - t0) * 1e3 / steps


def descend(opts: list[torch.optim.Optimizer], loss: Tensor, clip: float | None = None) -> None:
    """One step of ``opts`` on ``loss`` (their gradient norm clipped to ``clip``)."""
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    for opt in opts:
        opt.step()


def chain_of(cfg: DictConfig, pre: DictConfig, shape: list[int], **forced: Any) -> GaussianChain:
    """The T'-step chain to fine-tune: the pretrain stage's eps-network on its beta schedule,
    sub-sampled as ``method.sampler`` says (``diffft.diffusion``)."""
    kw = {**(pre.method.sampler or {}), **cfg.method.sampler, **forced}
    steps, kind, spacing = kw.pop("steps"), kw.pop("subsample", "none"), kw.pop("spacing", "linear")
    betas = beta_schedule(**pre.method.schedule)
    net = instantiate(cfg.backbone, event_shape=shape, n_steps=len(betas))
    return GaussianChain(net, subsample(betas, steps, kind, spacing), tuple(shape), **kw)


def bare_ddpm(cfg: DictConfig, shape: list[int]) -> Callable[[Tensor], None]:
    """A DDPM step: ``denoising_loss``, the optimiser and its cosine schedule, clip, EMA."""
    m = cfg.method
    net = instantiate(m.backbone, event_shape=shape, n_steps=m.schedule.steps)
    params = list(net.parameters())
    ema = list(copy.deepcopy(net).requires_grad_(False).parameters())
    opt = instantiate(m.optimizer, params=params)
    cosine = m.lr_schedule == "cosine"  # (over trainer.max_steps, as Lightning steps diffft's)
    sched = CosineAnnealingLR(opt, cfg.trainer.max_steps) if cosine else None
    ab, g = alpha_bar(beta_schedule(**m.schedule)).float(), torch.Generator().manual_seed(0)

    def step(x: Tensor) -> None:
        loss = denoising_loss(net, x, ab, generator=g, antithetic=m.antithetic)
        descend([opt], loss, m.grad_clip)
        if sched is not None:
            sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - m.ema_decay)

    return step


def bare_sft_pg(cfg: DictConfig, pre: DictConfig, shape: list[int]) -> Callable[[Tensor], None]:
    """An SFT-PG (B) critic iteration (Alg. 1): rollout, ``ipm_critic_loss`` + lambda
    ``baseline_loss``; every ``n_critic`` iterations ``n_generator`` ``policy_gradient_loss``
    steps on minibatches of the buffered transitions."""
    hp = cfg.method
    if hp.estimator != "policy_gradient" or hp.gp or hp.log_prob_reduction != "sum":
        raise ValueError("the bare SFT-PG loop covers estimator=policy_gradient, gp=0, sum")
    chain = chain_of(cfg, pre, shape)
    critic = instantiate(hp.critic, event_shape=shape)
    baseline = instantiate(hp.baseline, event_shape=shape, n_steps=chain.steps)
    opt_g = instantiate(hp.optimizer, params=chain.parameters(), lr=hp.lr.generator)
    groups = [{"params": critic.parameters(), "lr": hp.lr.critic}]
    groups.append({"params": baseline.parameters(), "lr": hp.lr.baseline})
    opt_fb = instantiate(hp.optimizer, _partial_=True)(groups)
    g, buffer = torch.Generator().manual_seed(0), []

    def step(real: Tensor) -> None:
        traj = chain.sample(hp.rollout_batch, generator=g, return_trajectory=True)
        f_fake = critic(traj.sample).squeeze(-1)
        x_k, _, k = traj.transitions()
        r_b = losses.baseline_loss(baseline(x_k, k - 1).squeeze(-1), f_fake.repeat(traj.steps))
        descend([opt_fb], losses.ipm_critic_loss(critic(real), f_fake) + hp.baseline_reg * r_b)
        buffer.append(traj.states)
        if len(buffer) < hp.n_critic:
            return
        traj = Trajectory(torch.cat(buffer, dim=1))
        buffer.clear()
        x_k, x_prev, k = traj.transitions()
        x_0 = traj.sample.repeat(traj.steps, *[1] * len(shape))
        size = len(x_k) if hp.generator_batch == "all" else hp.generator_batch
        for _ in range(hp.n_generator):
            i = torch.randperm(len(x_k), generator=g)[:size]
            with torch.no_grad():
                adv = critic(x_0[i]).squeeze(-1) - baseline(x_k[i], k[i] - 1).squeeze(-1)
            loss = losses.policy_gradient_loss(chain.log_prob(x_prev[i], x_k[i], k[i]), adv)
            descend([opt_g], loss, hp.grad_clip)

    return step


def bare_dxmi(cfg: DictConfig, pre: DictConfig, shape: list[int]) -> Callable[[Tensor], None]:
    """A DxMI iteration (Alg. 1, joint TD): rollout, ``avr_update``, ``energy_loss``, ``td_loss``
    to the ``running_cost`` target, the reparameterised sampler step (``entropy_cost`` +
    ``running_cost`` + V); V and E are the networks of ``method.cost`` (``build_cost``); an
    optimiser per part, cosine learning rate."""
    hp = cfg.method
    chain = chain_of(cfg, pre, shape, learn_sigma=True)
    K, D, red = chain.steps, math.prod(shape), hp.running_cost_reduction
    cost = build_cost(OmegaConf.to_container(hp.cost, resolve=True), shape, K)
    if cost.energy is None or cost.time_costs is not None or hp.td_update != "joint":
        raise ValueError("the bare DxMI loop covers Alg. 1: a learned energy, joint TD")
    tau1, tau2 = (hp.tau if t is None else t for t in (hp.tau1, hp.tau2))
    params = {"sampler": list(chain.eps_net.parameters()), "sigma": [chain.log_sigma]}
    opts = {
        n: instantiate(hp.optimizer, params=p, lr=hp.lr[n])
        for n, p in (params | cost.parts()).items()
    }
    total = cfg.trainer.max_epochs * -(-cfg.dataset.n_train // cfg.dataset.batch_size)
    cosine = lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))  # noqa: E731
    scheds = [LambdaLR(opt, cosine) for opt in opts.values()]
    s2, g = chain.fixed_sigma.square().clone(), torch.Generator().manual_seed(0)

    def step(real: Tensor) -> None:
        traj = chain.sample(
            hp.rollout_batch, generator=g, return_trajectory=True, return_noise=True
        )
        x_k, x_prev, k = traj.transitions()
        sq = (x_k - x_prev).flatten(1).square().sum(1)
        with torch.no_grad():
            s2[1:] = losses.avr_update(s2[1:], sq.view(K, -1).mean(1) / D, hp.avr_alpha)
        loss = losses.energy_loss(cost.energy(real), cost.energy(traj.sample), hp.gamma)
        descend([opts.get("energy", opts["value"])], loss)
        with torch.no_grad():
            log_pi = chain.log_prob_of_noise(traj.transition_noise(), k)
            run = losses.running_cost(log_pi, sq, s2[k], tau1, tau2, D, red)
            target = cost.value(x_prev, k - 1) + run
        descend([opts["value"]], losses.td_loss(cost.value(x_k, k), target))
        i = torch.randperm(len(x_k), generator=g)[: hp.sampler_batch]
        xs, ks = x_k[i], k[i]
        new = chain.step(xs, ks, torch.randn(xs.shape, generator=g))
        entropy = losses.entropy_cost(chain.log_sigma_table()[ks], D)
        run = losses.running_cost(entropy, (xs - new).square().sum(1), s2[ks], tau1, tau2, D, red)
        loss = (cost.value(new, ks - 1) + run).mean()
        descend([opts["sampler"], opts["sigma"]], loss, hp.grad_clip)
        for sched in scheds:
            sched.step()

    return step


# -- the per-step parts -------------------------------------------------------------------------
def compare(part: str, title: str, runs: dict[str, Callable[[], float]], repeats: int) -> list[str]:
    """``repeats`` interleaved runs of every loop (the bare one first): their medians."""
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            ms[name].append(run())
    med = {name: statistics.median(xs) for name, xs in ms.items()}
    b, d = med["bare loop"], med["diffft"]
    lines = [title, "", f"  {'loop':<11} {'ms/step':>8}  {'min-max':>13}  ratio"]
    for name, xs in ms.items():
        spread = f"{min(xs):.3f}-{max(xs):.3f}"
        lines.append(f"  {name:<11} {med[name]:8.3f}  {spread:>13}  {b / med[name]:5.2f}")
    ref = f"; released code {SFT_ITERATION_S * 1e3:.0f} ms" if part == "sft_step" else ""
    tail = f"ratio {b / d:.2f} (bare ms / diffft ms; target >= 0.9){ref}"
    return [*lines, "", f"{part}: bare {b:.2f} ms, diffft {d:.2f} ms per step, {tail}"]


def bench_step(tmp: Path, quick: bool, bar: bool = True) -> list[str]:
    """diffft's DDPM against ``bare_ddpm`` (swiss_roll_ddpm); ``diffft+bar``: with the progress
    bar that ``diffft.train`` shows by default (redrawn every ``progress_refresh_rate``)."""
    cfg, dm = config(tmp, "experiment=swiss_roll_ddpm")
    sizes = (5, 40, 1) if quick else (100, 3000, 3)  # warm-up, timed steps, repeats
    shape, batch = list(dm.event_shape), cfg.dataset.batch_size
    runs = {
        "bare loop": lambda: bare_ms(bare_ddpm(cfg, shape), dm.train, batch, sizes),
        "diffft": lambda: diffft_ms(cfg, dm, build(cfg), sizes),
    }
    if bar:
        runs["diffft+bar"] = lambda: diffft_ms(cfg, dm, build(cfg), sizes, bar=True)
    title = (
        f"DDPM step (swiss_roll_ddpm: TimeMLP, T={cfg.method.schedule.steps}, batch {batch},"
        f" {torch.get_num_threads()} thread): {sizes[1]} steps after {sizes[0]}, median of"
        f" {sizes[2]} repeats"
    )
    return compare("step", title, runs, sizes[2])


def bench_finetune(tmp: Path, quick: bool, part: str) -> list[str]:
    """A fine-tuning method's iteration (one Lightning batch) against its bare loop, both from
    the same pretrain stage's DDPM architecture."""
    sft = part == "sft_step"
    cfg, dm = config(tmp, f"experiment={'swiss_roll_sft_pg' if sft else 'eight_gaussians_dxmi'}")
    ckpt, pre = pretrained(tmp, cfg)
    shape, batch, hp = list(dm.event_shape), cfg.dataset.batch_size, cfg.method
    sizes = (5, 20, 1) if quick else (10, 1500, 3)
    bare = bare_sft_pg if sft else bare_dxmi
    runs = {
        "bare loop": lambda: bare_ms(bare(cfg, pre, shape), dm.train, batch, sizes),
        "diffft": lambda: diffft_ms(cfg, dm, build(cfg, ckpt), sizes),
    }
    net = lambda c: c._target_.rsplit(".", 1)[-1]  # noqa: E731
    if sft:
        what = f"SFT-PG critic iteration ({cfg.task_name}: T'={hp.sampler.steps}, critic"
        what += f" {net(hp.critic)}, baseline {net(hp.baseline)}, {hp.n_generator} policy-gradient"
        what += f" step on {hp.generator_batch} buffered transitions every {hp.n_critic} iterations"
    else:
        what = f"DxMI iteration ({cfg.task_name}: T={hp.sampler.steps}, {net(hp.cost)},"
        what += f" {hp.td_update} TD, {hp.sampler_batch} sampler transitions, {hp.lr_schedule} lr"
    title = (
        f"{what}; batch {batch}, {hp.rollout_batch} rollouts, {torch.get_num_threads()} thread):"
    )
    title += f" {sizes[1]} iterations after {sizes[0]}, median of {sizes[2]} repeats"
    return compare(part, title, runs, sizes[2])


# -- wall time of whole runs --------------------------------------------------------------------
class StopAtQuality(L.Callback):
    """Added to a run by config (``+callbacks.bench``, after ``PeriodicEvaluation``): at each
    periodic evaluation (every ``every`` batches) records ``eval/<metric>``, stops fit at the first
    value <= ``target`` and writes ``{start, stop, batch, seen}`` (wall clock) to ``path``."""

    def __init__(self, path: str, metric: str, target: float, every: int) -> None:
        self.path, self.metric, self.target, self.every = Path(path), metric, target, every
        self.batches, self.out = 0, {"seen": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out["start"] = time.time()
        self.path.write_text(json.dumps(self.out))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1
        if self.batches % self.every or "stop" in self.out:
            return
        value = float(trainer.callback_metrics[f"eval/{self.metric}"])
        self.out["seen"].append([self.batches, value])
        if value <= self.target:
            self.out |= {"stop": time.time(), "batch": self.batches}
            trainer.should_stop = True
        self.path.write_text(json.dumps(self.out))


def bench_run(tmp: Path, quick: bool, part: str) -> list[str]:
    """Wall time of ``diffft.train.train`` (from its call) until a periodic evaluation (one draw)
    reaches a sw_paper target, against the released SFT-PG code. ``quality``: DDPM pretraining
    (swiss_roll_ddpm) to 8.5 (the released DDPM ends at 8.1-8.3); ``sft_e2e``:
    ``swiss_roll_sft_pg_fast`` from an empty cache (the DDPM stage, then SFT-PG) to the data
    floor (mean + sd of its draws). ``--quick``: a few batches, stopping at the first evaluation."""
    e2e = part == "sft_e2e"
    every = (10 if e2e else 20) if quick else (1580 if e2e else 500)
    small = ["eval.n=500", "eval.draws=2", "eval.floor_draws=2", "eval.periodic_n=500"]
    small += ["pretrain.debug=fast", "trainer.max_epochs=-1", "trainer.max_steps=24"] if e2e else []
    overrides = [
        "experiment=swiss_roll_sft_pg_fast" if e2e else "experiment=swiss_roll_ddpm",
        "eval.metrics=[sw_paper]" if quick or not e2e else "eval.metrics=[sw_paper,sw,w2]",
        *(["~eval.compare", "eval.solvers=null"] if e2e else []),
        *(small if quick else ["eval.periodic_n=10000"]),
    ]
    target, reference = 8.5, SFT_REFERENCE_S if e2e else PRETRAIN_S
    if quick:
        target = 1e9
    elif e2e:
        cfg, dm = config(tmp, *overrides)
        e = cfg.eval
        floor = Evaluator(dm, ["sw_paper"], n=e.n, seed=e.seed, floor_draws=e.floor_draws)
        sw = floor.floor()["sw_paper"]
        target = statistics.mean(sw) + statistics.stdev(sw)
    path = tmp / "stop.json"
    stop = f"{{_target_: {__name__}.StopAtQuality, path: '{path}', metric: sw_paper,"
    stop += f" target: {target}, every: {every}}}"
    cfg = config(tmp, *overrides, f"eval.every_n_batches={every}", f"+callbacks.bench={stop}")[0]
    run = dtrain.train
    t0 = time.time()
    with quiet():
        rows = run(cfg)
    total, rec = time.time() - t0, json.loads(path.read_text())
    lines = [
        f"Wall time of diffft.train.train ({cfg.task_name}) until a periodic sw_paper (every"
        f" {every} batches) <= {target:.3g}:",
        "",
        "  sw_paper by batch: " + ", ".join(f"{b}: {v:.2f}" for b, v in rec["seen"]),
    ]
    if "stop" not in rec:
        return [*lines, f"{part}: not reached ({total:.1f} s in run()), ratio n/a"]
    s = rec["stop"] - t0
    lines.append(
        f"  reached at batch {rec['batch']}: {s:.1f} s from the call of run() (fit started at"
        f" {rec['start'] - t0:.1f} s); run() overall {total:.1f} s with the final evaluation"
    )
    for metric, v in next(iter(rows.values())).items():
        lines.append(f"  final {metric}: {statistics.mean(v):.4g} ({len(v)} draws)")
    return [
        *lines,
        "",
        f"{part}: diffft {s:.1f} s, released code {reference:.0f} s, ratio {reference / s:.1f}"
        f" (speed-up; target >= 5)",
    ]


# -- images, memory, DDP --------------------------------------------------------------------
def bench_images(tmp: Path, quick: bool) -> list[str]:
    """Samples/s of the digits chain (8x8, the UNet of ``digits_ddpm``, untrained, its threads;
    --quick: one) at T' = 10 and 4 (FastDPM VAR: what fine-tuning is for) over the full T = 1000;
    and (not --quick) ms per SFT-PG / DxMI iteration on the digits under the trainer."""
    cfg, dm = config(tmp, "experiment=digits_ddpm")
    threads, n = (1, 2) if quick else (cfg.threads, 256)
    torch.set_num_threads(threads)
    shape, m, betas = tuple(dm.event_shape), cfg.method, beta_schedule(**cfg.method.schedule)
    net = instantiate(m.backbone, event_shape=list(shape), n_steps=len(betas))
    chain = lambda k, kind: GaussianChain(net, subsample(betas, k, kind), shape, **m.sampler)  # noqa: E731
    chains = {f"T={len(betas)} (full chain)": chain(len(betas), "none")}
    chains |= {f"T'={k} (fastdpm_var)": chain(k, "fastdpm_var") for k in (10, 4)}
    size = sum(p.numel() for p in net.parameters()) / 1e6
    lines = [f"Images: digits 8x8, UNet {size:.2f}M parameters, {threads} threads, n = {n}:", ""]
    lines.append("  chain                  s per call  samples/s")
    rate, g = {}, torch.Generator()
    with torch.no_grad():
        chain(4, "fastdpm_var").sample(n, generator=g)  # warm-up
        for name, c in chains.items():
            t = time.perf_counter()
            c.sample(n, generator=g)
            rate[name] = n / (time.perf_counter() - t)
            lines.append(f"  {name:22} {n / rate[name]:10.2f}  {rate[name]:9.1f}")
    for name in [] if quick else ["digits_sft_pg", "digits_dxmi"]:
        ft, ft_dm = config(tmp, f"experiment={name}")
        ms = diffft_ms(ft, ft_dm, build(ft, pretrained(tmp, ft)[0]), (2, 20))
        lines.append(f"  {name} T'=10: {ms:.1f} ms per iteration of {ft.dataset.batch_size} images")
    torch.set_num_threads(1)
    full, short = rate[next(iter(chains))], rate["T'=10 (fastdpm_var)"]
    return [
        *lines,
        "",
        f"images: T'=10 {short:.1f} samples/s, T=1000 {full:.2f} samples/s, ratio"
        f" {short / full:.0f} (speed-up of the short chain)",
    ]


def bench_memory(tmp: Path, quick: bool) -> list[str]:
    """``experiments/memory.py``'s probe, a process each: peak RSS and time of BPTT through K
    steps of the digits UNet chain, without and with per-step checkpointing."""
    sys.path.insert(0, str(Path(__file__).parent))
    from memory import run_probe

    os.environ["DIFFFT_BENCH_THREADS"] = "1" if quick else "2"
    n, ks = (8, (2,)) if quick else (64, (10, 20, 40))
    lines = [
        f"BPTT through the digits UNet chain ({n} chains, {os.environ['DIFFFT_BENCH_THREADS']}"
        " threads; peak RSS above the warm-up's, median of 3 steps):",
        "",
        "  steps  no checkpoint: MB  s/step | checkpointed: MB  s/step",
    ]
    for k in ks:  # (--quick: both probes at once)
        probe = lambda c, k=k: run_probe("bptt", steps=k, checkpoint=c, n=n)  # noqa: E731
        with ThreadPoolExecutor(1 + quick) as pool:
            a, b = pool.map(probe, (False, True))
        lines.append(
            f"  {k:5d}  {a['peak_mb']:16.0f} {a['s_per_step']:7.2f} |"
            f" {b['peak_mb']:15.0f} {b['s_per_step']:7.2f}"
        )
    mem = f"{a['peak_mb'] / b['peak_mb']:.1f}" if b["peak_mb"] >= 1 else "n/a (< 1 MB)"
    slow = b["s_per_step"] / a["s_per_step"]
    return [
        *lines,
        "",
        f"memory: K={k}: ratio {mem} = peak memory without / with checkpointing, at {slow:.2f}x"
        " the time per step",
    ]


DDP_RUNS = {
    "DDPM": ["experiment=swiss_roll_ddpm", "trainer.max_steps=2100"],
    "SFT-PG": [  # ~1.5 min of critic iterations, from a DDPM of a few steps
        "experiment=swiss_roll_sft_pg_fast", "trainer.max_epochs=-1", "trainer.max_steps=-1",
        "+trainer.max_time=00:00:01:30", "pretrain.debug=fast",
    ],
}  # fmt: skip


def bench_ddp(tmp: Path, quick: bool) -> list[str]:
    """Batches/s of ``python -m diffft.train ... hardware=ddp_cpu trainer.devices=N`` (N = 1, 2:
    Lightning's DDP on gloo, a process per rank, one thread each), timed by
    ``diffft.callbacks.throughput.Throughput`` after a warm-up. Each rank takes a full batch, so
    samples/s = batches/s x 128 x ranks."""
    skip = 10 if quick else 100
    runs = {"DDPM": ["experiment=swiss_roll_ddpm", "trainer.max_steps=60"]} if quick else DDP_RUNS
    lines = [f"DDP on CPU (hardware=ddp_cpu, gloo), after {skip} warm-up batches:", ""]
    lines.append("  method   ranks  batches/s  samples/s  speed-up")
    speedup = {}

    def batches_per_s(name: str, ranks: int) -> float:
        path, throughput = tmp / f"{name}-{ranks}.json", "diffft.callbacks.throughput.Throughput"
        cmd = [
            sys.executable, "-m", "diffft.train", *runs[name], "hardware=ddp_cpu",
            f"trainer.devices={ranks}", "eval.every_n_batches=0", "eval.compare=null",
            "callbacks.model_checkpoint.monitor=null", "eval.solvers=null", "eval.n=1000",
            "eval.draws=2", "eval.floor_draws=2", "eval.metrics=[sw_paper]",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}/{name}-{ranks}",
            f"+callbacks.throughput={{_target_: {throughput}, path: '{path}', skip: {skip}}}",
            f"paths.cache_dir={tmp}/cache",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(path.read_text())["batches_per_s"]

    for name in runs:
        with ThreadPoolExecutor(1 + quick) as pool:  # --quick: both runs at once
            rate = dict(enumerate(pool.map(lambda r, n=name: batches_per_s(n, r), (1, 2)), 1))
        for ranks, r in rate.items():
            samples = r * 128 * ranks
            lines.append(
                f"  {name:7}  {ranks:5}  {r:9.1f}  {samples:9.0f}  {samples / rate[1] / 128:5.2f}x"
            )
        speedup[name] = 2 * rate[2] / rate[1]
    each = ", ".join(f"{name} {s:.2f}" for name, s in speedup.items())
    return [
        *lines,
        "",
        f"ddp: samples/s of 2 ranks over 1: ratio {each} (2 at best, on two free cores; this"
        f" machine has {os.cpu_count()} logical cores, shared with other work)",
    ]


# -- main ---------------------------------------------------------------------------------------
PARTS: dict[str, Callable[..., list[str]]] = {
    "step": bench_step,
    "quality": lambda tmp, quick: bench_run(tmp, quick, "quality"),
    "sft_step": lambda tmp, quick: bench_finetune(tmp, quick, "sft_step"),
    "sft_e2e": lambda tmp, quick: bench_run(tmp, quick, "sft_e2e"),
    "dxmi_step": lambda tmp, quick: bench_finetune(tmp, quick, "dxmi_step"),
    "images": bench_images,
    "memory": bench_memory,
    "ddp": bench_ddp,
}
SUBPROCESS_PARTS = ("memory", "ddp")  # their own processes: --quick runs them beside the others


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's and diffft's prints (bars, summary tables) out of the bench's output."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        with contextlib.redirect_stderr(null):
            yield


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()}"
        f" cores (shared with other work; load average {load}), torch {torch.__version__},"
        f" lightning {L.__version__}, threads={torch.get_num_threads()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="every part at tiny sizes (smoke test)")
    p.add_argument("--no-bar", action="store_true", help="step: skip the progress-bar variant")
    p.add_argument("--out", type=Path, help="the report (default: results/bench[_quick][_PART].md)")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available", tips
    logging.getLogger("diffft").setLevel(logging.WARNING)  # cached stage notes
    warnings.filterwarnings("ignore")  # Lightning's few-workers and logging-interval notices
    names = [name for name in PARTS if args.part in (name, "all")]
    lines = [f"machine: {machine()}"]
    lines += ["--quick: tiny sizes, a smoke test: no number below is a measurement"] * args.quick
    print("\n".join(lines), flush=True)
    with (
        tempfile.TemporaryDirectory() as d,
        initialize_config_module("diffft.conf", version_base="1.3"),
        ThreadPoolExecutor(2) as pool,
    ):

        def part(name: str) -> list[str]:
            (Path(d) / name).mkdir()
            t = time.perf_counter()
            kw = {"bar": not args.no_bar} if name == "step" else {}
            out = PARTS[name](Path(d) / name, args.quick, **kw)
            return ["", *out, f"({name}: {time.perf_counter() - t:.0f} s)"]

        aside = {n: pool.submit(part, n) for n in names if args.quick and n in SUBPROCESS_PARTS}
        for name in names:
            out = aside[name].result() if name in aside else part(name)
            print("\n".join(out), flush=True)
            lines += out
    lines += [
        "",
        f"{os.cpu_count()} cores shared with other work: absolute times move with its load (see"
        " the load average); ratios pair interleaved runs and are steadier.",
    ]
    command = " ".join([".venv/bin/python", "experiments/bench.py", *sys.argv[1:]])
    header = [f"# diffft benchmark ({datetime.now():%Y-%m-%d %H:%M})", "", f"command: `{command}`"]
    name = "bench" + "_quick" * args.quick + ("" if args.part == "all" else f"_{args.part}")
    out_file = args.out or RESULTS / f"{name}.md"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join([*header, "", "```", *lines, "```", ""]))
    print(f"\nsaved to {out_file}")


if __name__ == "__main__":
    main()

"""Peak memory and time of the image-sized backward passes, on the CPU (``make bench --part
memory``, or this script alone).

Each measurement runs in a fresh process (``--probe``): the peak resident memory of the
measured step above the process's high-water mark before it (``ru_maxrss``, after building the
model and one warm-up step of a one-step chain), and the median time of 3 steps. Two cases:

* ``bptt``: back-propagation through a K-step chain of the digits UNet (0.46M parameters, 8x8,
  untrained weights), 64 chains, a loss on x_0 and on an intermediate state (the contrastive
  chain's), with and without per-step gradient checkpointing (``GaussianChain.sample``);
* ``grad_chunk``: one SFT-PG policy-gradient step on 3,200 buffered transitions of the digits
  T' = 10 chain, all at once or accumulated over chunks (``FineTuneMethod.accumulate``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _digits_ddpm() -> Any:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with initialize_config_module("diffft.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_ddpm", "dataset.event_shape=[1,8,8]"])
    return instantiate(
        OmegaConf.to_container(cfg.method, resolve=True), _recursive_=False, _convert_="all"
    )


def probe_bptt(steps: int, checkpoint: bool, n: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    chain = _digits_ddpm().short_chain(steps, "fastdpm_var")

    def step(k: int) -> None:
        chain.zero_grad()
        g = torch.Generator().manual_seed(k)
        traj = chain.sample(
            n, generator=g, return_trajectory=True, grad=True, checkpoint=checkpoint
        )
        mid = traj.states[traj.steps // 2]
        (traj.states[0].square().mean() + mid.square().mean()).backward()

    warm = chain if steps == 1 else _digits_ddpm().short_chain(1, "fastdpm_var")
    warm.sample(n, grad=True).square().mean().backward()
    base = _rss_mb()
    times = []
    for k in range(3):
        t = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - t)
    return {"peak_mb": _rss_mb() - base, "s_per_step": statistics.median(times)}


def probe_grad_chunk(chunk: int | None, n_traj: int = 320) -> dict[str, float]:
    from diffft.methods.sft_pg import SFTPG

    torch.manual_seed(0)
    ddpm = _digits_ddpm()
    method = SFTPG(
        event_shape=[1, 8, 8],
        sampler={"steps": 10, "subsample": "fastdpm_var"},
        critic={"_target_": "diffft.nets.conv.DCGANCritic", "width": 64},
        baseline={"_target_": "diffft.nets.mlp.TimeMLP", "width": 256, "depth": 2, "out_dim": 1},
        generator_batch="all",
        log_prob_reduction="mean",
        grad_chunk=chunk,
        ddpm=dict(ddpm.hparams),
    )
    method.manual_backward = lambda loss: loss.backward()  # no trainer here
    opt = torch.optim.Adam(method.chain.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    method.buffer = [method.chain.sample(n_traj, generator=g, return_trajectory=True).states]
    states = method.buffer[0]
    one = torch.ones(8, dtype=torch.long)
    method.chain.log_prob(states[0][:8], states[1][:8], one).sum().backward()  # warm-up
    base = _rss_mb()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        method.policy_gradient_steps(opt, g)
        times.append(time.perf_counter() - t)
    return {
        "peak_mb": _rss_mb() - base,
        "s_per_step": statistics.median(times),
        "transitions": n_traj * 10,
    }


def run_probe(kind: str, **kwargs: Any) -> dict[str, float]:
    """One measurement in a fresh process (its own memory high-water mark)."""
    cmd = [sys.executable, __file__, "--probe", json.dumps({"kind": kind, **kwargs})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(threads: int = 2) -> list[str]:
    os.environ["DIFFFT_BENCH_THREADS"] = str(threads)
    lines = [
        f"BPTT through the digits UNet chain (64 chains, {threads} threads; peak RSS above the "
        "warm-up high-water mark, median of 3 steps):",
        "",
        "  steps  no checkpoint: MB   s/step | checkpointed: MB   s/step | memory / time",
    ]
    for steps in (10, 20, 40):
        a = run_probe("bptt", steps=steps, checkpoint=False)
        b = run_probe("bptt", steps=steps, checkpoint=True)
        ratio = a["peak_mb"] / max(b["peak_mb"], 1e-3)
        lines.append(
            f"  {steps:5d}  {a['peak_mb']:16.0f} {a['s_per_step']:8.2f} | "
            f"{b['peak_mb']:16.0f} {b['s_per_step']:8.2f} | "
            f"{ratio:5.1f}x less / {b['s_per_step'] / a['s_per_step']:4.2f}x time"
        )
    lines += [
        "",
        "SFT-PG policy-gradient step on 3,200 buffered digits transitions (method.grad_chunk):",
        "",
        "  grad_chunk   peak MB   s/step",
    ]
    for chunk in (None, 800, 200):
        r = run_probe("grad_chunk", chunk=chunk)
        lines.append(f"  {str(chunk):10} {r['peak_mb']:9.0f} {r['s_per_step']:8.2f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", help="(internal) one measurement, as JSON")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.probe:
        torch.set_num_threads(int(os.environ.get("DIFFFT_BENCH_THREADS", "2")))
        spec = json.loads(args.probe)
        kind = spec.pop("kind")
        result = {"bptt": probe_bptt, "grad_chunk": probe_grad_chunk}[kind](**spec)
        print(json.dumps(result))
        return
    print("\n".join(bench_memory(args.threads)))


if __name__ == "__main__":
    main()

"""``python -m diffft.sample ckpt=PATH n=10000 [steps=T'] [solver=ddim|dpmpp2m] out=samples.npy``:
write samples of a trained sampler as a plain ``.npy`` array ``[n, D]`` (float32).

Default: the checkpoint's own chain (a fine-tuned T'-step chain, or a DDPM's full chain).
``steps`` sub-samples a DDPM's chain (``subsample`` kind); ``solver`` runs a training-free
diffusers solver for ``steps`` steps on a DDPM's eps-network instead.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffft.diffusion.sampler import SOLVERS, Sampler
from diffft.methods.base import load_method
from diffft.methods.ddpm import DDPM


def checkpoint_sampler(
    ckpt: str, steps: int | None = None, subsample: str = "uniform", solver: str | None = None
) -> Sampler:
    """The ``Sampler`` that ``steps`` / ``subsample`` / ``solver`` name for a checkpoint."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt: no such file '{ckpt}'")
    method = load_method(ckpt).eval()
    chain = method.eval_chain
    if (solver is not None or steps not in (None, chain.steps)) and not isinstance(method, DDPM):
        raise ValueError(
            f"steps={steps}, solver={solver}: this {type(method).__name__} checkpoint was "
            f"fine-tuned for its {chain.steps}-step chain; leave steps and solver unset (or "
            "sample its pretrained DDPM instead)"
        )
    if solver is not None:
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}; expected one of {sorted(SOLVERS)}")
        if steps is None:
            raise ValueError(f"solver={solver} needs steps=S (the number of solver steps)")
        return method.solver(steps, solver)
    if steps is not None and steps != chain.steps:
        return method.short_chain(steps, subsample)
    return chain


def sample_checkpoint(
    ckpt: str,
    n: int,
    steps: int | None = None,
    subsample: str = "uniform",
    seed: int = 0,
    solver: str | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    sampler = checkpoint_sampler(ckpt, steps, subsample, solver)
    g = torch.Generator(sampler.device).manual_seed(seed)
    with torch.no_grad():
        x = sampler.sample(n, generator=g, batch_size=batch_size)
    return x.cpu().numpy().astype(np.float32)


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    x = sample_checkpoint(
        cfg.ckpt, cfg.n, cfg.steps, cfg.subsample, cfg.seed, cfg.solver, cfg.batch_size
    )
    np.save(cfg.out, x)
    print(f"wrote {x.shape[0]} samples of dimension {x.shape[1]} to {cfg.out}")


if __name__ == "__main__":
    main()

"""``python -m diffft.sample ckpt=PATH n=10000 steps=T' out=samples.npy``: write samples of a
trained sampler as a plain ``.npy`` array ``[n, D]`` (float32)."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffft.methods.base import load_method
from diffft.methods.ddpm import DDPM


def sample_checkpoint(
    ckpt: str, n: int, steps: int | None = None, subsample: str = "uniform", seed: int = 0
) -> np.ndarray:
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt: no such file '{ckpt}'")
    method = load_method(ckpt).eval()
    chain = method.eval_chain
    if steps is not None and steps != chain.steps:
        if not isinstance(method, DDPM):
            raise ValueError(
                f"steps={steps}: this {type(method).__name__} checkpoint was fine-tuned for "
                f"{chain.steps} steps; leave steps unset (or sample its pretrained DDPM instead)"
            )
        chain = method.short_chain(steps, subsample)
    with torch.no_grad():
        x = chain.sample(n, generator=torch.Generator().manual_seed(seed))
    return x.cpu().numpy().astype(np.float32)


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    x = sample_checkpoint(cfg.ckpt, cfg.n, cfg.steps, cfg.subsample, cfg.seed)
    np.save(cfg.out, x)
    print(f"wrote {x.shape[0]} samples of dimension {x.shape[1]} to {cfg.out}")


if __name__ == "__main__":
    main()

"""``python -m diffft.sample ckpt=PATH n=10000 [steps=T'] [solver=ddim|dpmpp2m] out=samples.npy``:
write samples of a trained sampler as a plain float32 ``.npy`` array of shape ``[n, *event_shape]``:
``[n, D]`` for points, ``[n, C, H, W]`` in [-1, 1] for images. ``out=DIR/`` (a trailing slash or an
existing folder) writes image samples as PNG files ``DIR/000000.png`` ... instead.

Default: the checkpoint's own chain (a fine-tuned T'-step chain, or a DDPM's full chain).
``steps`` sub-samples a DDPM's chain (``subsample`` kind); ``solver`` runs a training-free
diffusers solver for ``steps`` steps on a DDPM's eps-network instead.

Points are written in the data's own units: a model trained with ``dataset.normalize=standard``
samples in normalised units, and the normalisation its checkpoint carries (``diffft_data``, the
data identity) converts them back, so the checkpoint alone is enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffft.data.base import Normalization
from diffft.diffusion.sampler import SOLVERS, Sampler
from diffft.methods.base import load_method
from diffft.methods.ddpm import DDPM


def checkpoint_sampler(
    ckpt: str, steps: int | None = None, subsample: str = "uniform", solver: str | None = None
) -> Sampler:
    """The ``Sampler`` that ``steps`` / ``subsample`` / ``solver`` name for a checkpoint."""
    return method_sampler(_load(ckpt), steps, subsample, solver)


def _load(ckpt: str) -> Any:
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt: no such file '{ckpt}'")
    return load_method(ckpt).eval()


def method_sampler(
    method: Any, steps: int | None = None, subsample: str = "uniform", solver: str | None = None
) -> Sampler:
    """The ``Sampler`` that ``steps`` / ``subsample`` / ``solver`` name for a loaded method."""
    by_nfe = {r.nfe: r for r in method.rows() if r.nfe is not None and r.role != "init"}
    if by_nfe and solver is None:  # e.g. a distilled student per number of steps
        if steps is None:
            return method.main_row().sampler
        if steps not in by_nfe:
            raise ValueError(f"steps={steps}: this checkpoint samples with {sorted(by_nfe)} steps")
        return by_nfe[steps].sampler
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
    """``n`` samples of the checkpoint's sampler as float32 ``[n, *event_shape]`` in the data's
    units (images ``[n, C, H, W]`` clipped to [-1, 1])."""
    # Checked first: n=0 would load the model only to write an empty array without a word.
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n}: expected an int >= 1 (the number of samples to write)")
    method = _load(ckpt)
    sampler = method_sampler(method, steps, subsample, solver)
    g = torch.Generator(sampler.device).manual_seed(seed)
    with torch.no_grad():
        x = sampler.sample(n, generator=g, batch_size=batch_size)
    norm = Normalization.from_identity(method.data_identity)
    if norm is not None:  # model units -> the data's own
        x = norm.to_data(x.double())
    if x.dim() == 4:  # images: clipped to the data's [-1, 1] (Inception FID clamps the same way)
        x = x.clamp(-1.0, 1.0)
    return x.cpu().numpy().astype(np.float32)


def write_pngs(x: np.ndarray, folder: str | Path) -> list[Path]:
    """Image samples ``[n, C, H, W]`` in [-1, 1] as 8-bit PNGs ``folder/000000.png`` ...
    (C = 1 grey, C = 3 RGB)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"out=DIR/ writes images [n, 1|3, H, W]; these samples have shape {list(x.shape)}: "
            "write them to a .npy file instead (out=samples.npy)"
        )
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    paths = []
    for i, img in enumerate(pixels):
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    out = str(cfg.out)
    as_pngs = out.endswith(("/", "\\")) or Path(out).is_dir()
    x = sample_checkpoint(
        cfg.ckpt, cfg.n, cfg.steps, cfg.subsample, cfg.seed, cfg.solver, cfg.batch_size
    )
    if as_pngs:
        write_pngs(x, out)
        print(f"wrote {x.shape[0]} PNG images of shape {list(x.shape[1:])} to {out}")
    else:
        np.save(out, x)
        print(f"wrote {x.shape[0]} samples of shape {list(x.shape[1:])} to {out}")


if __name__ == "__main__":
    main()

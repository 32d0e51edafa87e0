"""``python -m diffft.score ckpt=PATH in=points.npy out=energy.npy``: the energy of any points
under a trained energy-based method (DxMI), written as a float32 ``.npy`` array ``[n]``.

``in`` is a ``.npy`` or ``.csv`` array ``[n, D]`` (as ``dataset=points_file`` reads it) with the
checkpoint's data dimension D, in the data's own units (a model trained with
``dataset.normalize=standard`` gets them normalised by the statistics its checkpoint carries).
Low energy = likely under the model (data-like).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from diffft.data.base import Normalization
from diffft.data.toy import DataError, load_points_file
from diffft.methods.base import load_method


def score_points(ckpt: str, points: np.ndarray, batch_size: int = 10_000) -> np.ndarray:
    """The energy ``[n]`` of ``points`` ``[n, D]`` (data units) under the checkpoint's learned
    energy."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt: no such file '{ckpt}'")
    method = load_method(ckpt).eval()
    energy = method.main_row().energy
    if energy is None:
        raise ValueError(
            f"ckpt: this {type(method).__name__} checkpoint has no learned energy; "
            "diffft.score needs an energy-based method (method=dxmi)"
        )
    shape = method.chain.event_shape
    if tuple(points.shape[1:]) != tuple(shape):
        raise ValueError(
            f"in: points of shape {tuple(points.shape)}, but the model's data are {shape}"
        )
    x = torch.as_tensor(points, dtype=torch.float64)
    norm = Normalization.from_identity(method.data_identity)
    if norm is not None:  # the data's units -> the model's
        x = norm.to_model(x)
    x = x.float()
    with torch.no_grad():
        out = [energy(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).cpu().numpy().astype(np.float32)


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="score")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    try:
        points = load_points_file(cfg["in"])
    except DataError as err:  # its message names dataset.path: here the key is `in`
        raise SystemExit(f"error: {str(err).replace('dataset.path', 'in', 1)}") from None
    e = score_points(cfg.ckpt, points, cfg.batch_size)
    np.save(cfg.out, e)
    print(f"wrote the energy of {e.shape[0]} points to {cfg.out} (min {e.min():.4g}, "
          f"mean {e.mean():.4g}, max {e.max():.4g})")  # fmt: skip


if __name__ == "__main__":
    main()

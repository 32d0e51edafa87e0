"""Sample plots: scatter of each sampler's samples over the data (2-D)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def scatter_samples(
    samples: dict[str, torch.Tensor], data: torch.Tensor, path: str | Path, n: int = 5_000
) -> Path:
    """One panel per sampler: its samples (blue) on top of real data (grey); dims 0 and 1."""
    k = len(samples)
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 4), squeeze=False)
    lo = data[:, :2].min(0).values - 0.25 * data[:, :2].std(0)
    hi = data[:, :2].max(0).values + 0.25 * data[:, :2].std(0)
    for ax, (name, x) in zip(axes[0], samples.items(), strict=True):
        d, x = data[:n].cpu(), x[:n].detach().cpu()
        ax.scatter(d[:, 0], d[:, 1], s=1, c="0.7", alpha=0.5, label="data")
        ax.scatter(x[:, 0], x[:, 1], s=1, c="tab:blue", alpha=0.5, label="samples")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(lo[0].item(), hi[0].item())
        ax.set_ylim(lo[1].item(), hi[1].item())
        ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Sample plots: scatter of each sampler's samples over the data (2-D and up), histograms (1-D),
image grids."""

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
    return _save(fig, path)


def histogram_samples(
    samples: dict[str, torch.Tensor],
    data: torch.Tensor,
    path: str | Path,
    n: int = 5_000,
    bins: int = 60,
) -> Path:
    """One panel per sampler: the histogram of its samples (blue) over the real data's (grey), for
    1-D points (a one-column points file), which have no second dimension to scatter against."""
    k = len(samples)
    fig, axes = plt.subplots(1, k, figsize=(4 * k, 3), squeeze=False)
    d = data[:n, 0].float().cpu()
    pad = 0.25 * d.std().item()
    edges = torch.linspace(d.min().item() - pad, d.max().item() + pad, bins + 1).numpy()
    for ax, (name, x) in zip(axes[0], samples.items(), strict=True):
        x = x[:n].detach().float().cpu().flatten(1)[:, 0]
        ax.hist(d.numpy(), bins=edges, density=True, color="0.7", alpha=0.7, label="data")
        ax.hist(x.numpy(), bins=edges, density=True, histtype="step", color="tab:blue", lw=1.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(edges[0], edges[-1])
    return _save(fig, path)


def _grid(data: torch.Tensor, n: int = 200) -> tuple[torch.Tensor, tuple[float, ...]]:
    lo = data[:, :2].min(0).values - 0.25 * data[:, :2].std(0)
    hi = data[:, :2].max(0).values + 0.25 * data[:, :2].std(0)
    xs = torch.linspace(lo[0].item(), hi[0].item(), n)
    ys = torch.linspace(lo[1].item(), hi[1].item(), n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    extent = (lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item())
    return torch.stack([gx.flatten(), gy.flatten()], 1), extent


@torch.no_grad()
def _on_grid(fn, points: torch.Tensor, device: torch.device, n: int) -> torch.Tensor:
    return fn(points.to(device)).float().cpu().view(n, n)


def energy_map(
    energy,
    data: torch.Tensor,
    samples: torch.Tensor,
    path: str | Path,
    title: str,
    device: torch.device | str = "cpu",
    n: int = 200,
) -> Path:
    """DxMI Fig. 2: the energy on a grid over the data (light = low) with samples on top;
    ``energy`` maps points ``[m, 2]`` on ``device`` to ``[m]``."""
    pts, extent = _grid(data.cpu(), n)
    e = _on_grid(energy, pts, device, n)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(e.numpy(), origin="lower", extent=extent, cmap="Reds", aspect="equal")
    x = samples[:5_000].detach().cpu()
    ax.scatter(x[:, 0], x[:, 1], s=1, c="tab:blue", alpha=0.4)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(f"{title}: energy (light = low) and samples", fontsize=9)
    return _save(fig, path)


def value_maps(
    value,
    steps: int,
    data: torch.Tensor,
    path: str | Path,
    device: torch.device | str = "cpu",
    n: int = 120,
) -> Path:
    """DxMI Fig. 3: the value ``V_k`` on a grid for k = K (noise) ... 0 (= the energy), blue =
    low; ``value(x, k)`` takes points and a LongTensor of steps."""
    pts, extent = _grid(data.cpu(), n)
    fig, axes = plt.subplots(1, steps + 1, figsize=(3 * (steps + 1), 3), squeeze=False)
    for ax, k in zip(axes[0], range(steps, -1, -1), strict=True):

        def fn(x: torch.Tensor, k: int = k) -> torch.Tensor:
            return value(x, torch.full((x.shape[0],), k, dtype=torch.long, device=x.device))

        v = _on_grid(fn, pts, device, n)
        ax.imshow(v.numpy(), origin="lower", extent=extent, cmap="coolwarm", aspect="equal")
        ax.set_title(f"V_{k}" + (" = energy" if k == 0 else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tile(images: torch.Tensor, cols: int = 8, pad: int = 1) -> torch.Tensor:
    """``[n, C, H, W]`` images in [-1, 1] tiled into one ``[rows*(H+pad), cols*(W+pad), C]``
    array in [0, 1] (light padding)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)[
        : cols * max(1, -(-len(images) // cols))
    ]
    n, c, h, w = x.shape
    rows = -(-n // cols)
    out = torch.ones(rows * (h + pad), cols * (w + pad), c)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = x[i].permute(
            1, 2, 0
        )
    return out


def image_grids(samples: dict[str, torch.Tensor], path: str | Path, n: int = 64) -> Path:
    """One panel per row: a grid of its first ``n`` images."""
    k = len(samples)
    fig, axes = plt.subplots(1, k, figsize=(3 * k, 3.3), squeeze=False)
    for ax, (name, x) in zip(axes[0], samples.items(), strict=True):
        grid = tile(x[:n])
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def trajectory_grid(states: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """One trajectory per row, ``x_K`` (noise) on the left to ``x_0`` on the right;
    ``states`` is ``[K+1, n, C, H, W]`` with ``states[0]`` the sample."""
    steps = states.shape[0]
    rows = states.flip(0).transpose(0, 1).reshape(-1, *states.shape[2:])  # row i: x_K..x_0
    grid = tile(rows, cols=steps)
    fig, ax = plt.subplots(figsize=(0.5 * steps + 1, 0.5 * states.shape[1] + 0.6))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title or f"trajectories: x_{steps - 1} (noise) to x_0", fontsize=8)
    ax.axis("off")
    return _save(fig, path)


# Panels of training_curves, in this order: what a run's health is read from first.
_CURVE_PREFIXES = ("loss/", "diag/", "sigma/", "energy/", "value/", "eval/")


def training_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """One panel per logged curve of a run's ``metrics.csv`` (losses, ``diag/*`` diagnostics,
    eval metrics; all ``sigma/k*`` in one panel) against metrics.csv's step; None when the file
    is missing or holds no curve. Written as ``training.png`` beside ``samples.png``."""
    import csv

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    series: dict[str, list[tuple[float, float]]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if value and key and key.startswith(_CURVE_PREFIXES):
                    series.setdefault(key, []).append((step, float(value)))
    sigmas = sorted((k for k in series if k.startswith("sigma/k")), key=lambda k: int(k[7:]))
    panels = [[k] for k in series if not k.startswith("sigma/k")]
    order = lambda p: next(i for i, pre in enumerate(_CURVE_PREFIXES) if p[0].startswith(pre))  # noqa: E731
    panels.sort(key=order)
    if sigmas:
        panels.append(sigmas)
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, keys in zip(axes.flat, panels, strict=False):
        for key in keys:
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, lw=1, marker="." if len(xs) < 30 else None, label=key.split("/")[-1])
        ax.set_title("sigma_k" if keys is sigmas else keys[0], fontsize=9)
        if keys is sigmas:
            ax.set_yscale("log")
            ax.legend(fontsize=6, ncol=2)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step (metrics.csv)", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)

"""DDPM pretraining results on the two toy paper setups, through the real CLI.

``python experiments/ddpm_results.py [--quick] [--jobs N] [--force]`` trains and evaluates one
``python -m diffft.train`` run per row (as ``nice``-d subprocesses, outputs under
``experiments/runs/ddpm/<row-id>``), reads each run's ``summary.json`` and writes
``experiments/results/ddpm.md`` (``ddpm_quick.md`` with ``--quick``, a smoke version). A row
whose ``summary.json`` already exists is skipped unless ``--force``, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffft.evaluation import Evaluator

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments" / "runs" / "ddpm"
RESULTS = ROOT / "experiments" / "results"
COMMON = [
    "eval.every_n_batches=0",
    "callbacks.model_checkpoint.monitor=null",
    "trainer.enable_progress_bar=false",
]
QUICK = ["trainer.max_steps=200", "eval.n=1000", "eval.draws=2"]


@dataclass(frozen=True)
class Row:
    table: str  # "swiss" or "gauss"
    experiment: str
    schedule: str  # "sigmoid" (paper setup) or "cosine" (strong baseline)
    steps: int
    paper: str  # the paper reference cell

    @property
    def id(self) -> str:
        return f"{self.table}-{self.schedule}-T{self.steps}"

    def overrides(self) -> list[str]:
        out = [f"experiment={self.experiment}", f"method.schedule.steps={self.steps}"]
        return out + (
            [f"method.schedule.name={self.schedule}"] if self.schedule != "sigmoid" else []
        )


SR, EG = "swiss_roll_ddpm", "eight_gaussians_ddpm"
SR_PAPER = {
    10: "8.29 (released code: 8.12 ± 0.31)",
    100: "2.36 (released code: 3.10 ± 0.38)",
    1000: "1.78",
}
EG_PAPER = {5: "0.967 ± 0.005", 10: "0.824 ± 0.002", 100: "0.241 ± 0.003", 1000: "0.123 ± 0.014"}
ROWS = (
    [Row("swiss", SR, "sigmoid", t, SR_PAPER[t]) for t in (10, 100, 1000)]
    + [Row("swiss", SR, "cosine", t, "–") for t in (10, 100)]
    + [Row("gauss", EG, "sigmoid", t, EG_PAPER[t]) for t in (5, 10, 100, 1000)]
    + [Row("gauss", EG, "cosine", t, "–") for t in (5, 10, 100)]
)
SEEDS = (0, 1, 2)
SOLVER_STEPS = (10, 4, 2)
FULL_DRAWS = 10  # as the SFT-PG results (3 seeds x 10 draws), which reuse these rows


FULL_EXPERIMENTS = {"swiss": "swiss_roll_ddpm_full", "gauss": "eight_gaussians_ddpm_full"}


@dataclass(frozen=True)
class FullRow:
    """A T = 1000 DDPM on the sinusoidal time-embedding MLP (one seed, ``table`` "swiss" or
    "gauss"), with the DDIM / DPM-Solver++ rows at ``SOLVER_STEPS`` evaluated in the same run."""

    table: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.table}-full-T1000-s{self.seed}"

    def overrides(self) -> list[str]:
        solvers = ",".join(
            f"{{steps:{s},solver:{k}}}" for s in SOLVER_STEPS for k in ("ddim", "dpmpp2m")
        )
        return [
            f"experiment={FULL_EXPERIMENTS[self.table]}",
            "backbone=sinusoidal_mlp",
            f"seed={self.seed}",
            f"eval.draws={FULL_DRAWS}",
            f"method.eval_steps=[{solvers}]",
        ]


FULL_ROWS = [FullRow(t, s) for t in ("swiss", "gauss") for s in SEEDS]
METRICS = {"swiss": ["sw_paper", "sw", "w2"], "gauss": ["sw", "w2"]}
LABELS = {
    "sw_paper": "sw_paper (SW2 100 proj vs train, ×1e-2)",
    "sw": "sw (SW2 1000 proj vs test)",
    "w2": "w2 (exact W2, 2K pts, ×1e-2)",
}
FLOOR_REF = {"swiss": "–", "gauss": "≈ 0.045 ± 0.014"}


# Run configs written before eval.floor_draws existed get the current default.
FLOOR_DRAWS = OmegaConf.load(str(resources.files("diffft.conf") / "train.yaml")).eval.floor_draws


def train_config(dataset: str) -> DictConfig:
    """The default train config on ``dataset``."""
    with initialize_config_module("diffft.conf", version_base="1.3"):
        return compose("train", overrides=[f"dataset={dataset}"])


def evaluator(cfg: DictConfig, draws: int | None = None) -> Evaluator:
    """The ``Evaluator`` of a config (a run's ``config.yaml`` or ``train_config``): its data,
    eval settings and floor cache; ``draws`` replaces ``eval.draws``."""
    dm = instantiate(cfg.dataset)
    dm.setup()
    ev = cfg.eval
    return Evaluator(
        dm,
        list(ev.metrics),
        n=ev.n,
        draws=draws or ev.draws,
        seed=ev.seed,
        w2_points=ev.w2_points,
        cache_dir=str(ROOT / cfg.paths.cache_dir),
        floor_draws=ev.get("floor_draws") or FLOOR_DRAWS,
    )


def run_row(row: Row | FullRow, runs: Path, extra: list[str], force: bool) -> float | None:
    """Train and evaluate one row; returns its wall time (None when skipped)."""
    out = runs / row.id
    if (out / "summary.json").is_file() and not force:
        print(f"[skip] {row.id}: {out / 'summary.json'} exists", flush=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "10", sys.executable, "-m", "diffft.train", *row.overrides()]
    cmd += [*COMMON, *extra, f"paths.output_dir={out.relative_to(ROOT)}"]
    print(f"[start] {row.id}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{row.id} failed (rc={rc}); see {out / 'log.txt'}")
    print(f"[done] {row.id}: {wall:.0f} s", flush=True)
    (out / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    a = np.asarray(values, dtype=float)
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    digits = 5 if abs(a.mean()) < 0.1 else 3  # sw is ~0.005: keep 2-3 significant digits
    return f"{a.mean():.{digits}f} ± {sd:.{digits}f}"


def load(runs: Path, row: Row) -> dict[str, list[float]] | None:
    """The model's row from a run's summary.json, or None if not there."""
    path = runs / row.id / "summary.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    model = rows.get(f"DDPM T={row.steps}") or next(v for k, v in rows.items() if k != "data floor")
    return model


def full_rows(runs: Path, name: str) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Every sampler row of table ``name``'s ``FULL_ROWS`` runs pooled over seeds (seeds x
    draws), and the number of seeds that have run."""
    paths = [runs / r.id / "summary.json" for r in FULL_ROWS if r.table == name]
    done = [json.loads(p.read_text()) for p in paths if p.is_file()]
    pooled: dict[str, dict[str, list[float]]] = {}
    for summary in done:
        for name, vals in summary.items():
            if name == "data floor":
                continue
            for m, v in vals.items():
                pooled.setdefault(name, {}).setdefault(m, []).extend(v)
    return pooled, len(done)


def full_table(runs: Path, name: str) -> str:
    rows, seeds = full_rows(runs, name)
    if not rows:
        return "not run yet."
    metrics, paper_t1000 = METRICS[name], (SR_PAPER if name == "swiss" else EG_PAPER)[1000]
    head = ["model", *(LABELS[m] for m in metrics), "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, vals in rows.items():
        paper = paper_t1000 if row == "DDPM T=1000" else "–"
        cells = [cell(vals.get(m)) for m in metrics]
        lines.append(f"| {row} ({seeds} seeds) | " + " | ".join(cells) + f" | {paper} |")
    first = next(r for r in FULL_ROWS if r.table == name)
    cfg = OmegaConf.load(runs / first.id / "config.yaml")
    cells = [cell(evaluator(cfg).floor().get(m)) for m in metrics]
    lines.append("| data floor | " + " | ".join(cells) + " | – |")
    return "\n".join(lines)


def table(runs: Path, name: str) -> tuple[str, dict[str, float]]:
    """A markdown table of one dataset's rows, and the first-metric mean per row id."""
    metrics = METRICS[name]
    head = ["model", *(LABELS[m] for m in metrics), "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[str, float] = {}
    done: Row | None = None  # a row that has run: its config gives the floor's settings
    for row in (r for r in ROWS if r.table == name):
        kind = "paper setup (sigmoid 1e-5..1e-2)" if row.schedule == "sigmoid" else "cosine"
        kind += ", gated MLP"  # backbone=time_mlp, the SFT-PG toy net
        model = load(runs, row)
        if model is None:
            lines.append(
                f"| DDPM T={row.steps}, {kind} | "
                + " | ".join(["not run"] * len(metrics))
                + f" | {row.paper} |"
            )
            continue
        done = row
        means[row.id] = float(np.mean(model[metrics[0]]))
        cells = [cell(model.get(m)) for m in metrics]
        lines.append(f"| DDPM T={row.steps}, {kind} | " + " | ".join(cells) + f" | {row.paper} |")
    if done is not None:  # the runs' own floors have eval.draws draws; this one floor_draws
        data_floor = evaluator(OmegaConf.load(runs / done.id / "config.yaml")).floor()
        cells = [cell(data_floor.get(m)) for m in metrics]
        lines.append("| data floor | " + " | ".join(cells) + f" | {FLOOR_REF[name]} |")
    return "\n".join(lines), means


def ratios(means: dict[str, float], name: str, steps: tuple[int, ...]) -> str:
    parts = []
    for t in steps:
        a, b = means.get(f"{name}-cosine-T{t}"), means.get(f"{name}-sigmoid-T{t}")
        if a is not None and b is not None:
            parts.append(f"T={t}: {a / b:.2f}")
    return ", ".join(parts) or "(rows missing)"


def loss_drift(runs: Path, row: Row) -> float | None:
    """Relative change of the mean train loss, last 10% of steps vs the 10% before (>0: still
    falling). A rough convergence check on the logged (single-batch) losses."""
    path = runs / row.id / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:  # by name: the column order changes with periodic evaluation
        loss = np.array([float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")])
    k = max(1, len(loss) // 10)
    if len(loss) < 2 * k:
        return None
    before, last = loss[-2 * k : -k].mean(), loss[-k:].mean()
    return float((before - last) / before)


def notes(runs: Path, sr: dict[str, float], eg: dict[str, float]) -> str:
    paper_sr, paper_eg = (
        {10: 8.29, 100: 2.36, 1000: 1.78},
        {5: 0.967, 10: 0.824, 100: 0.241, 1000: 0.123},
    )
    vs_sr = [
        f"T={t}: {sr[f'swiss-sigmoid-T{t}'] / v:.2f}"
        for t, v in paper_sr.items()
        if f"swiss-sigmoid-T{t}" in sr
    ]
    vs_eg = [
        f"T={t}: {eg[f'gauss-sigmoid-T{t}'] / v:.2f}"
        for t, v in paper_eg.items()
        if f"gauss-sigmoid-T{t}" in eg
    ]
    drift = {r.id: loss_drift(runs, r) for r in ROWS}
    drift_s = ", ".join(f"{k} {v:+.1%}" for k, v in drift.items() if v is not None)
    return (
        f"- Ours / paper (paper-setup rows), swiss roll sw_paper: {', '.join(vs_sr) or '–'}; "
        f"8 gaussians sw: {', '.join(vs_eg) or '–'}.\n"
        f"- Strong baseline (cosine) / paper setup, same T, swiss roll sw_paper: "
        f"{ratios(sr, 'swiss', (10, 100))}; 8 gaussians sw: {ratios(eg, 'gauss', (5, 10, 100))}"
        f" (< 1: the cosine schedule is better).\n"
        f"- Train-loss drift (mean logged loss, last 10% of steps vs the 10% before; positive ="
        f" still falling): {drift_s or '–'}."
    )


def write(out_file: Path, runs: Path, argv: list[str], quick: bool, skipped: int) -> None:
    sr, sr_means = table(runs, "swiss")
    eg, eg_means = table(runs, "gauss")
    walls = {p.parent.name: float(p.read_text()) for p in sorted(runs.glob("*/wall_s.txt"))}
    n, draws = ("1K", 2) if quick else ("10K", 5)
    steps = (
        "200 steps (quick)"
        if quick
        else "swiss roll 40K steps (Adam, cosine lr), 8 gaussians 8K steps"
    )
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]  # read-only
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    rev = commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    reused = f"; {skipped} rows reused from an earlier invocation" if skipped else ""
    per_row = ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
    title = "DDPM pretraining: toy paper setups" + (" (QUICK smoke run, not results)" * quick)
    text = f"""# {title}

command: `{" ".join(["python", "experiments/ddpm_results.py", *argv])}`
date: {datetime.now():%Y-%m-%d %H:%M}, code: {rev}
machine: {platform.platform()}, {os.cpu_count()} CPU cores shared with other work (load \
{load_avg} at the end), CPU only, threads=1, runs niced. Total wall time (sum over rows, \
sequential): {sum(walls.values()) / 60:.1f} min{reused}. Per row (s): {per_row}.

Each cell: mean ± sd over {draws} evaluation draws of {n} samples (sd with ddof=1; the data
floor: `eval.floor_draws` draws, see `diffft/evaluation.py` for why more). Training
length is the experiment default ({steps}), the same for every row; the final EMA weights
(decay 0.999) are evaluated. `paper setup` = sigmoid betas 1e-5..1e-2 with T steps used
directly; `cosine` = the strong baseline: the same T-step DDPM with the cosine schedule (ends
near alpha_bar = 0).
Runs: `{runs.relative_to(ROOT)}/<row-id>/`.

## Swiss roll (SFT-PG Table 1; paper column = sw_paper)

{sr}

## Swiss roll, full chain T = 1000 on the sinusoidal time-embedding MLP, and solvers on it

`experiment=swiss_roll_ddpm_full backbone=sinusoidal_mlp` (width 64, sigmoid betas 1e-5..1e-2,
batch 256, 20K Adam steps with cosine decay), {len(SEEDS)} seeds x {FULL_DRAWS} draws of {n}
samples per cell. The DDIM (eta = 0) and DPM-Solver++(2M) rows are diffusers' schedulers
(trailing timesteps) driven by the same eps-network at T' steps: what a user would try instead
of fine-tuning (`diffft.diffusion.sampler`).

{full_table(runs, "swiss")}

## 8 gaussians (DxMI Table 1; paper column = sw)

{eg}

## 8 gaussians, full chain T = 1000 on the sinusoidal time-embedding MLP, and solvers on it

`experiment=eight_gaussians_ddpm_full backbone=sinusoidal_mlp` (width 64, sigmoid betas,
batch 512, 20K Adam steps at lr 1e-3), {len(SEEDS)} seeds x {FULL_DRAWS} draws of {n} samples.

{full_table(runs, "gauss")}

## Notes

{notes(runs, sr_means, eg_means)}
"""
    marker = "## Observations (hand-written)"
    if out_file.is_file() and marker in (old := out_file.read_text()):
        text += "\n" + old[old.index(marker) :]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    print(f"wrote {out_file}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke version (200 steps, 2x1K)")
    p.add_argument("--jobs", type=int, default=1, help="rows run in parallel")
    p.add_argument("--force", action="store_true", help="rerun rows that already have results")
    args = p.parse_args()
    runs = RUNS.parent / "ddpm_quick" if args.quick else RUNS
    out_file = RESULTS / ("ddpm_quick.md" if args.quick else "ddpm.md")
    extra = QUICK if args.quick else []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_row, r, runs, extra, args.force) for r in [*ROWS, *FULL_ROWS]]
        errors = [f.exception() for f in futures if f.exception() is not None]
    skipped = sum(1 for f in futures if f.exception() is None and f.result() is None)
    total = time.perf_counter() - t0
    for e in errors:
        print(f"[error] {e}", file=sys.stderr, flush=True)
    write(out_file, runs, sys.argv[1:], args.quick, skipped)
    print(f"wall time of this invocation {total / 60:.1f} min", flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

"""Entry point: ``python -m diffft.train experiment=... [overrides]``.

Builds the datamodule, method, callbacks, logger and trainer from the composed config, runs the
``pretrain`` stage first when a fine-tuning method has no ``init_from`` (cached by config hash),
trains, then evaluates every sampler the method names against the data floor and prints a
summary table. Writes into ``paths.output_dir``: ``config.yaml`` (resolved), ``checkpoints/``
(``last.ckpt``, ``best.ckpt``), ``metrics.csv``, ``samples.png``, ``summary.md``/``.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import hydra
import lightning as L
import torch
from hydra import compose
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffft.callbacks.evaluation import PeriodicEvaluation
from diffft.evaluation import Evaluator, format_table
from diffft.methods.base import load_method
from diffft.plots import scatter_samples

log = logging.getLogger("diffft")

# Keys that do not change what a pretraining run produces (left out of its cache key).
_NOT_IN_CACHE_KEY = (
    "paths",
    "logger",
    "callbacks",
    "task_name",
    "eval",
    "ckpt_path",
    "hydra",
    "progress_refresh_rate",
)


def pretrain_key(cfg: DictConfig) -> str:
    """A short hash of the resolved config, without output/logging keys."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in _NOT_IN_CACHE_KEY:
        c.pop(k, None)
    c.get("trainer", {}).pop("enable_progress_bar", None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_stage(cfg: DictConfig, overrides: list[str]) -> str:
    """Train the run that ``overrides`` compose to (or reuse it) and return its ``last.ckpt``.

    Runs are cached under ``paths.cache_dir`` by a hash of their resolved config, so a second
    fine-tuning run (or a sweep over fine-tuning seeds) reuses the same pretrained model.
    """
    pre, key, out = _stage(cfg, overrides)
    ckpt = out / "checkpoints" / "last.ckpt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Runs in parallel (a sweep, the results scripts) that need the same stage train it once:
    # the first takes the lock and trains, the others wait for it and reuse its checkpoint.
    with _file_lock(out.parent / f"{out.name}.lock", f"cached stage {overrides}"):
        if _is_cached(out):
            log.info("cached stage %s: reusing %s", overrides, ckpt)
            return str(ckpt)
        log.info("cached stage %s: no cached checkpoint, training into %s", overrides, out)
        if out.exists():  # an interrupted earlier attempt: Lightning would not overwrite its ckpt
            shutil.rmtree(out)
        with open_dict(pre):
            pre.paths.output_dir = str(out)
            pre.paths.cache_dir = cfg.paths.cache_dir
            pre.threads = cfg.threads
            pre.trainer.enable_progress_bar = cfg.trainer.enable_progress_bar
        train(pre)
        (out / "done").write_text(key)
    return str(ckpt)


def _stage(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, str, Path]:
    """The composed config of the stage ``overrides`` describe, its cache key and directory."""
    if any(o.startswith("paths.") for o in overrides):
        raise ValueError(f"cached stage {overrides}: must not set paths.* (it is cached by config)")
    if cfg.pretrain.debug:
        overrides = [*overrides, f"debug={cfg.pretrain.debug}"]
    pre = compose(config_name="train", overrides=[*overrides, "paths.output_dir=unset"])
    key = pretrain_key(pre)
    return pre, key, Path(cfg.paths.cache_dir) / "pretrain" / f"{pre.task_name}-{key}"


def _is_cached(stage_dir: Path) -> bool:
    return (stage_dir / "done").is_file() and (stage_dir / "checkpoints/last.ckpt").is_file()


@contextlib.contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where unavailable)."""
    with open(path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: another run holds %s; waiting for it", what, path)
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def build_trainer(cfg: DictConfig, evaluator: Evaluator) -> L.Trainer:
    out = Path(cfg.paths.output_dir)
    callbacks: list[L.Callback] = []
    if cfg.eval.every_n_batches > 0:
        callbacks.append(
            PeriodicEvaluation(evaluator, cfg.eval.every_n_batches, cfg.eval.periodic_n)
        )
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cfg.trainer.get("enable_progress_bar", True):
        # Redrawn every batch, tqdm costs ~0.4 ms of a 2 ms toy step.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=out)


def train(cfg: DictConfig) -> dict[str, dict[str, list[float]]]:
    """Train and evaluate one run; returns ``{sampler or 'data floor': {metric: [values]}}``."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Before the pretraining stage, so that both stages train at once on two cores.
    background = start_compare_stages(cfg) if rank_zero_only.rank == 0 else []

    method_kwargs: dict[str, Any] = {}
    if "init_from" in cfg.method and not cfg.method.init_from:
        if not cfg.pretrain.overrides:
            raise ValueError(
                "method.init_from is empty and no pretrain stage is configured; set "
                "method.init_from=PATH/last.ckpt (a DDPM checkpoint) or pretrain.overrides"
            )
        method_kwargs["init_from"] = cached_stage(cfg, list(cfg.pretrain.overrides))
        L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    # Plain containers: the hyper-parameters in a checkpoint then load with weights_only=True.
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = instantiate(method_cfg, _recursive_=False, _convert_="all", **method_kwargs)
    evaluator = Evaluator(
        datamodule,
        list(cfg.eval.metrics),
        n=cfg.eval.n,
        draws=cfg.eval.draws,
        seed=cfg.eval.seed,
        w2_points=cfg.eval.w2_points,
        cache_dir=cfg.paths.cache_dir,
        floor_draws=cfg.eval.floor_draws,
    )
    trainer = build_trainer(cfg, evaluator)
    trainer.fit(method, datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.checkpoint_callbacks:
        # ModelCheckpoint(save_last=True) rewrites last.ckpt only when it saves a new best one;
        # this makes last.ckpt the end of training, whatever the intervals and the monitor say.
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
    if trainer.global_rank != 0:
        return {}
    try:
        return report(cfg, method, datamodule, evaluator, out)
    finally:
        for proc in background:  # normally finished: report() waited for their stage locks
            proc.wait()


def report(
    cfg: DictConfig, method: Any, datamodule: Any, evaluator: Evaluator, out: Path
) -> dict[str, dict[str, list[float]]]:
    """Evaluate every sampler of ``method`` (plus any extra ``eval.compare`` checkpoints) beside
    the floor; print and save the table and a scatter plot."""
    method.eval()
    samplers = dict(method.samplers())
    # Extra rows: other models (e.g. the full-chain DDPM, a strong-schedule baseline), each
    # trained once by its own cached stage. A null entry removes a row an experiment inherited.
    stage_rows: dict[str, dict[str, list[float]] | None] = {}
    for name, overrides in compare_stages(cfg).items():
        ckpt = cached_stage(cfg, overrides)
        samplers[name] = load_method(ckpt).eval().eval_chain.to(method.device)
        stage_rows[name] = _stage_row(Path(ckpt).parents[1], cfg)
    rows = {
        name: stage_rows.get(name) or evaluator.evaluate(chain) for name, chain in samplers.items()
    }
    rows["data floor"] = evaluator.floor()
    references = OmegaConf.to_container(cfg.eval.references, resolve=True) or {}
    table = format_table(rows, evaluator.metrics, references)
    header = (
        f"{cfg.task_name}: {evaluator.draws} draws of {evaluator.n} samples, mean ± sd; "
        f"'data floor' = the same metric between independent real samples of the same size "
        f"({evaluator.floor_draws} draws)"
    )
    (out / "summary.md").write_text(header + "\n\n" + table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    g = torch.Generator().manual_seed(cfg.eval.seed)
    with torch.no_grad():
        shown = {name: chain.sample(5_000, generator=g) for name, chain in samplers.items()}
    scatter_samples(shown, datamodule.train, out / "samples.png")
    print("\n" + header + "\n" + table + f"\n\noutputs: {out}\n", flush=True)
    return rows


_EVAL_KEYS = ("n", "draws", "seed", "w2_points", "metrics")


def compare_stages(cfg: DictConfig) -> dict[str, list[str]]:
    """``{row name: overrides}`` of the ``eval.compare`` stages. Each is evaluated with this
    run's settings (eval keys are not part of its cache key), so its own summary gives the row
    without sampling the (e.g. 1000-step) chain again."""
    ev = cfg.eval
    same_eval = [f"eval.{k}={ev[k]}" for k in _EVAL_KEYS[:-1]]
    same_eval.append(f"eval.metrics=[{','.join(ev.metrics)}]")
    compare = ev.get("compare") or {}
    return {name: [*ov, *same_eval] for name, ov in compare.items() if ov is not None}


def start_compare_stages(cfg: DictConfig) -> list[subprocess.Popen]:
    """Train the ``eval.compare`` stages that are not cached yet in background processes (one
    thread each) while this run trains: on a 2-core machine the T=1000 DDPM of ``make run`` then
    costs no wall time. ``report`` waits for them on the stage lock (and trains a stage itself if
    its process failed). Off with ``eval.compare_in_background=false``."""
    if not cfg.eval.compare_in_background:
        return []
    stages = [ov for ov in compare_stages(cfg).values() if not _is_cached(_stage(cfg, ov)[2])]
    if not stages:
        return []
    out = Path(cfg.paths.output_dir)
    procs = []
    for i, overrides in enumerate(stages):
        # config.yaml: this run's resolved config, written by train() (cache dir, debug, threads)
        cmd = [sys.executable, "-m", "diffft.train_stage", str(out / "config.yaml"), *overrides]
        path = out / f"compare_stage_{i}.log"
        with open(path, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
        log.info("compare stage %s: training in the background (log %s)", overrides, path)
    return procs


def _stage_row(stage_dir: Path, cfg: DictConfig) -> dict[str, list[float]] | None:
    """The main row of a cached stage's summary, when it was evaluated as ``cfg`` evaluates."""
    summary, config = stage_dir / "summary.json", stage_dir / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    theirs = OmegaConf.load(config).eval
    if any(theirs.get(k) != cfg.eval.get(k) for k in _EVAL_KEYS):
        return None
    rows = json.loads(summary.read_text())
    return next((v for k, v in rows.items() if k != "data floor"), None)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()

"""Entry point: ``python -m diffft.train experiment=... [overrides]``.

``train`` checks the config, provides the stages the method declares (its pretrained DDPM, an
encoder: cached, ``diffft.report.stages``), fits the method (``fit``) and hands it to the
report layer (``diffft.report.table``), which evaluates every row against the data floor. Writes
into ``paths.output_dir``: ``config.yaml`` (resolved), ``checkpoints/`` (``last.ckpt``,
``best.ckpt``), ``metrics.csv``, ``samples.png``, ``training.png``, ``summary.md`` / ``.json``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffft import checks
from diffft.callbacks import build_callbacks, progress_bar
from diffft.callbacks.checkpoint import Interrupted, LastCheckpoint
from diffft.media import finish, log_config
from diffft.methods.base import NonFiniteLossError
from diffft.report import stages
from diffft.report.checks import check_eval
from diffft.report.table import build_evaluator, report

log = logging.getLogger("diffft")


def resolve_data(cfg: DictConfig) -> Any:
    """The run's datamodule; writes what the data decide back into ``cfg`` (``event_shape``,
    ``dim=null`` = a points file's columns, a points file's absolute path), so the saved config
    and every stage name the same data from any directory."""
    resolved, datamodule = stages.resolve_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))
    with open_dict(cfg):
        for key in ("path", "dim", "event_shape"):
            if resolved.get(key) is not None:
                cfg.dataset[key] = resolved[key]
    return datamodule


def save_config(cfg: DictConfig, trainer: L.Trainer) -> None:
    """``config.yaml``, resolved, with what one optimiser step averages over under DDP."""
    with open_dict(cfg):
        sizes = {k: v for k, v in cfg.method.items() if str(k).endswith("_batch") and v}
        sizes = {"batch_size": cfg.dataset.batch_size, **sizes}
        cfg.effective_batch = {"world_size": trainer.world_size}
        cfg.effective_batch.update({k: v * trainer.world_size for k, v in sizes.items()})
    if trainer.is_global_zero:
        path = Path(cfg.paths.output_dir) / "config.yaml"
        OmegaConf.save(cfg, path, resolve=True)
        log_config(trainer.loggers, OmegaConf.to_container(cfg, resolve=True), path)


def fit(cfg: DictConfig, datamodule: Any, trainer: L.Trainer) -> Any:
    """Fit the configured method (its declared stages provided first); returns it on rank 0,
    on the evaluation device, its ``last.ckpt`` written (None on the other ranks)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    kwargs = stages.provide(cfg, train)  # e.g. init_from: the cached DDPM stage's last.ckpt
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Plain containers: the hyper-parameters in a checkpoint then load with weights_only=True.
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    try:
        method = instantiate(method_cfg, _recursive_=False, _convert_="all", **kwargs)
    except InstantiationException as err:  # a config error: the method's own one-line message
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise
    method.data_identity = datamodule.identity()  # saved in its checkpoints
    method.seed = cfg.seed  # with the rank and the batch count: each batch's random stream
    stages.check_init_data(method, datamodule)
    trainer.fit(method, datamodule, ckpt_path=cfg.get("ckpt_path"))
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    if trainer.max_steps == 0:  # a 0-step run (released weights as a stage): Lightning skipped
        trainer.save_checkpoint(last.path)  # its hooks (on every rank: a barrier inside)
    if dist.is_available() and dist.is_initialized():
        # The report and any stage it trains run outside the process group (a stage inside it
        # would see a shard of the data); the other ranks stop here.
        trainer.strategy.barrier("diffft.train: end of fit")
        dist.destroy_process_group()
    if trainer.global_rank != 0:
        return None
    # Lightning's teardown leaves the module on the CPU; evaluate on the configured device.
    method.to(cfg.eval.get("device") or trainer.strategy.root_device)
    if method.batches_done == 0 and last.path.is_file():  # ddp_spawn: trained in the workers
        ckpt = torch.load(last.path, map_location="cpu", weights_only=False)
        method.batches_done = ckpt.get("diffft_batches_done", 0)
    return method


def train(cfg: DictConfig) -> dict[str, dict[str, list[float]]]:
    """One run: checks, stages, fit, report; returns ``{row label or 'data floor': {metric:
    [values]}}`` (empty on ranks other than 0). Also what a cached stage runs."""
    torch.set_num_threads(cfg.threads)
    checks.check_requires(cfg)
    datamodule = resolve_data(cfg)  # first: a bad path fails before any stage trains
    check_eval(cfg, datamodule.identity())
    checks.check_resume(cfg)
    checks.check_writable(cfg)
    checks.claim_output_dir(Path(cfg.paths.output_dir))
    evaluator = build_evaluator(cfg, datamodule)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = build_callbacks(cfg, evaluator)
    out = Path(cfg.paths.output_dir)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=out,
        enable_progress_bar=progress_bar(cfg),
    )
    failed, background = True, []
    try:
        save_config(cfg, trainer)
        if rank_zero_only.rank == 0:  # compare stages train in other processes meanwhile
            background = stages.start_compare_stages(cfg)
        method = fit(cfg, datamodule, trainer)
        rows = report(cfg, method, datamodule, evaluator, train, trainer.loggers) if method else {}
        failed = False
        return rows
    finally:  # also on failure: the next run of a sweep in this process gets its own W&B run
        finish(trainer.loggers, exit_code=int(failed))
        for proc in background:  # normally finished: report() waited for their stage locks
            proc.wait()


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    checks.check_overrides(list(hydra_cfg.overrides.task))
    checks.check_launch(cfg, hydra_cfg.mode)
    if hydra_cfg.mode == RunMode.RUN and hydra_cfg.sweeper.get("params"):
        log.warning(  # Hydra applies hydra.sweeper.params only in MULTIRUN mode
            "a sweep config without -m ignores its hydra.sweeper.params and runs the config as "
            "composed from the command line: add -m to run the sweep"
        )
    try:
        train(cfg)
    except (NonFiniteLossError, Interrupted, ValueError, FileNotFoundError) as err:
        # A user's mistake (a config or data error names the key or path and the fix) or a
        # stopped run: one line, not a traceback (HYDRA_FULL_ERROR=1 keeps it for developers).
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(err, Interrupted):
            raise  # an Exception: Hydra records this job as failed, the sweep goes on
        raise SystemExit(130 if isinstance(err, Interrupted) else 1) from None


if __name__ == "__main__":
    main()

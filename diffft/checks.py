"""Checks of a run's config made before anything trains (each a one-line error naming the key
and the fix), and the claim of its output directory."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import IO

from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffft.methods.base import read_checkpoint

try:
    import fcntl
except ImportError:  # Windows: no claim
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("diffft")
_claims: dict[str, IO[str]] = {}  # output dirs this process holds (open, flock'ed files)


def check_requires(cfg: DictConfig) -> None:
    """``requires``: each entry needs one of its ``keys`` set (not null), e.g. the released
    weights of a CIFAR-10 fine-tuning experiment; else a one-line error names the keys."""
    for name, spec in (cfg.get("requires") or {}).items():
        if spec is None:
            continue
        keys = list(spec.get("keys") or [])
        if keys and all(OmegaConf.select(cfg, k, default=None) is None for k in keys):
            raise ValueError(
                f"requires.{name}: this experiment needs {spec.get('why') or name}; set "
                + " or ".join(f"{k}=..." for k in keys)
            )


def check_resume(cfg: DictConfig) -> None:
    """``ckpt_path``: a readable checkpoint of this run's method, checked before any stage
    trains: Lightning reads it only when ``fit`` starts, after the pretraining stage, and then
    fails with torch's unpickling error or ~30 lines of missing and unexpected keys."""
    path = str(cfg.get("ckpt_path") or "")
    # Lightning's own names (last, best, hpc, registry[:...]) and remote URLs stay Lightning's.
    if not path or path in ("last", "best", "hpc") or path.startswith("registry") or "://" in path:
        return
    saved = read_checkpoint(path, "ckpt_path")["diffft_method"]
    cls = get_class(cfg.method._target_)
    ours = f"{cls.__module__}.{cls.__qualname__}"  # as SamplerMethod.on_save_checkpoint names it
    if saved != ours:
        raise ValueError(
            f"ckpt_path='{path}' holds a {saved} checkpoint, but this run's method is {ours}; "
            "resume from a checkpoint of a run of this method (a DDPM to fine-tune from goes "
            "to method.init_from)"
        )


def check_writable(cfg: DictConfig) -> None:
    """Fail before anything trains when the output or cache directory cannot be written."""
    for key in ("output_dir", "cache_dir"):
        path = Path(cfg.paths[key])
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")  # unique per process
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            how = "hydra.run.dir / hydra.sweep.dir" if key == "output_dir" else "$DIFFFT_CACHE"
            raise ValueError(
                f"paths.{key}='{path}' is not writable ({err.strerror or err}); set "
                f"paths.{key}=DIR (or {how}) to a writable directory"
            ) from None


def claim_output_dir(out: Path) -> None:
    """Hold ``out`` for this run (an advisory lock on ``out/.diffft-run.lock`` until the
    process ends): a second run started into the same folder stops with one line instead of
    overwriting the first one's files; a folder with an earlier, finished run's outputs is
    reused with a warning. Rank 0 claims (the other ranks of a DDP run share its folder)."""
    key = str(out.resolve())
    if fcntl is None or rank_zero_only.rank != 0 or key in _claims:
        return
    earlier = (out / "config.yaml").is_file()
    f = open(out / ".diffft-run.lock", "a")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(
            f"output directory '{out}' is in use by another run; give this run its own "
            "(hydra.run.dir=DIR, or leave it unset for a new timestamped one)"
        ) from None
    _claims[key] = f
    if earlier:
        log.warning("output directory '%s' holds an earlier run's files: they are replaced", out)


def check_launch(cfg: DictConfig, mode: RunMode) -> None:
    """Refuse what cannot work before anything runs: Lightning's ``popen`` DDP launcher
    re-executes the command line for every rank, so inside a ``-m`` sweep each rank would start
    the sweep again (SLURM, which starts the ranks itself, is fine)."""
    if mode != RunMode.MULTIRUN or "SLURM_NTASKS" in os.environ:
        return
    strategy = cfg.trainer.get("strategy")
    devices = cfg.trainer.get("devices", 1)
    if isinstance(strategy, DictConfig):
        popen = "DDP" in str(strategy.get("_target_", "")) and (
            strategy.get("start_method", "popen") == "popen"
        )
    else:
        popen = isinstance(strategy, str) and strategy.startswith("ddp") and "spawn" not in strategy
    if popen and devices not in (1, [0], "1"):
        raise ValueError(
            "a -m sweep with DDP's popen launcher (trainer.strategy.start_method=popen) would "
            "re-run the sweep on every rank; add trainer.strategy.start_method=spawn, or submit "
            "the sweep to SLURM (hardware=slurm)"
        )


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides that Hydra accepts but that do not do what they say."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "eval.compare" and value.strip() == "{}":
            raise ValueError(
                "eval.compare={} drops nothing (Hydra merges it into the inherited rows); use "
                "eval.compare=null to drop every compare row, eval.compare.ID=null for one"
            )

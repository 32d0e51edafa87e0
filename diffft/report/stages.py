"""Cached stages: the other runs a run needs (its DDPM pretraining, the ``eval.compare`` rows),
each trained once and cached under ``paths.cache_dir`` by a hash of its resolved config.

**The stage rule** (one place, for every kind of stage): a stage is composed from its own
overrides (e.g. ``[experiment=swiss_roll_ddpm, method.schedule.steps=1000]``), then the run's
``dataset`` node (every value, the file path included), ``backbone`` node and
``trainer.accelerator`` replace the stage's, and finally the keys the stage's overrides name
explicitly (``backbone=...``, ``dataset.batch_size=...``) are put back on top. So every row of a
table is trained on the data the table is about. Some things stay the stage's own:
``dataset.batch_size`` (a training hyper-parameter of the stage's recipe, not the data), the
precision, and the device count / strategy (a stage trains on one device, outside any process
group).

The cache key is the stage's resolved config without output, logging, evaluation and device-count
keys, plus the data's identity (``ToyDataModule.identity``: a points file by its content hash),
so a stage of other data is never reused. A cached stage's own summary row is reused in a table
only when its data identity and evaluation settings match the run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffft.locks import file_lock
from diffft.report.summary import main_values

log = logging.getLogger("diffft")

# What defines a stage (its cache key), an include list: a key not named here never changes reuse.
# Trainer keys that change what is trained (not the device count, strategy, logging or progress).
_TRAINER_KEYS_IN_KEY = (
    "max_steps", "max_epochs", "limit_train_batches", "precision", "accumulate_grad_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "accelerator", "deterministic",
)  # fmt: skip
# Carried from the run into every stage (unless the stage's overrides set them).
_CARRIED_NODES = ("dataset", "backbone")
# Precision stays the stage's own (fp32 by default): a cached pretraining is then shared by runs
# of any precision, and a "-true" half precision would round the DDPM's float64 schedule.
_CARRIED_TRAINER_KEYS = ("accelerator",)
_STAGE_OWN_DATA_KEYS = ("batch_size",)
# The evaluation settings a stage's summary row must share with the run to be reused.
EVAL_KEYS = ("n", "draws", "seed", "w2_points", "features", "inception_weights", "metrics")


def data_identity(dataset_cfg: DictConfig | dict) -> dict[str, Any]:
    """The identity of the data a ``dataset`` config describes (``ToyDataModule.identity``)."""
    return instantiate(dataset_cfg).identity()


def same_data(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two data identities are the same data (a moved or copied file is the same)."""
    strip = lambda d: {k: v for k, v in (d or {}).items() if k != "path"}  # noqa: E731
    return a is not None and b is not None and strip(a) == strip(b)


def check_init_data(method: Any, datamodule: Any) -> None:
    """Warn (one line) when the model a method starts from was trained on other data."""
    init = getattr(method, "init_data", None)
    if init is not None and not same_data(init, datamodule.identity()):
        log.warning(
            "method.init_from: its DDPM was trained on %s, but this run's data are %s",
            describe_data(init),
            describe_data(datamodule.identity()),
        )


def describe_data(identity: dict[str, Any]) -> str:
    """One line naming the data: the generator and its settings, or the file and its hash."""
    rest = ", ".join(f"{k}={v}" for k, v in identity.items() if k not in ("name", "path"))
    where = f" '{identity['path']}'" if identity.get("path") else ""
    return f"{identity['name']}{where} ({rest})"


def stage_key(cfg: DictConfig) -> str:
    """A short hash of what defines a stage: its data (the datamodule's ``identity()`` without
    where the file lies and the test split's size, and its ``training_settings()``: batch size,
    augmentation), the method (schedule, network, optimiser: the whole resolved ``method``
    node), the backbone, the trainer keys that change training (``_TRAINER_KEYS_IN_KEY``), the
    seed, and the stages the stage's own method needs (its ``pretrain`` ... node). Nothing
    else: output, logging, evaluation, device count and any key added later leave it alone."""
    c = OmegaConf.to_container(cfg, resolve=True)
    dm = instantiate(cfg.dataset)
    ident = {k: v for k, v in dm.identity().items() if k not in ("path", "n_test")}
    method_cls = get_class(c["method"]["_target_"])
    trainer = c.get("trainer") or {}
    key = {
        "data": {**ident, **dm.training_settings()},
        "method": c["method"],
        "backbone": c.get("backbone"),
        "trainer": {k: trainer.get(k) for k in _TRAINER_KEYS_IN_KEY},
        "seed": c.get("seed"),
        "stages": {node: c.get(node) for node in method_cls.stages(c["method"]).values()},
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def provide(run: DictConfig, runner: Callable[[DictConfig], Any]) -> dict[str, str]:
    """The checkpoints of the stages the run's method declares (``SamplerMethod.stages``), as
    constructor arguments: each trained by ``runner`` (or reused) from the ``overrides`` of its
    config node (``pretrain``, ``encoder_stage``, ...)."""
    method_cfg = OmegaConf.to_container(run.method, resolve=True)
    out = {}
    for arg, node in get_class(run.method._target_).stages(method_cfg).items():
        spec = run.get(node)
        if not spec or not spec.get("overrides"):
            raise ValueError(
                f"method.{arg} is empty and no {node} stage is configured; set "
                f"method.{arg}=PATH/last.ckpt or {node}.overrides=[experiment=...]"
            )
        out[arg] = cached_stage(run, list(spec.overrides), runner)
    return out


def _explicit_keys(overrides: list[str]) -> set[str]:
    """The config keys and group names a list of Hydra overrides sets (deletions left out)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group.removeprefix("/") for o in parsed if not o.is_delete()}


def stage_config(run: DictConfig, overrides: list[str]) -> DictConfig:
    """The composed config of the stage ``overrides`` describe, under the stage rule."""
    if any(o.startswith("paths.") for o in overrides):
        raise ValueError(f"cached stage {overrides}: must not set paths.* (it is cached by config)")
    if run.pretrain.debug:
        overrides = [*overrides, f"debug={run.pretrain.debug}"]
    stage = compose(config_name="train", overrides=[*overrides, "paths.output_dir=unset"])
    explicit = _explicit_keys(overrides)
    roots = (*_CARRIED_NODES, "trainer")
    own = {k: OmegaConf.select(stage, k) for k in explicit if k.split(".")[0] in roots}
    own = {k: v for k, v in own.items() if "." in k}
    with open_dict(stage):
        for node in _CARRIED_NODES:
            if node in explicit:  # the stage chose its own dataset / backbone group
                continue
            keep = {k: stage[node][k] for k in _STAGE_OWN_DATA_KEYS if node == "dataset"}
            value = OmegaConf.to_container(run[node], resolve=True)
            if node == "dataset":
                value, _ = resolve_dataset(value)
            stage[node] = OmegaConf.create(value)
            stage[node].update(keep)
        if "hardware" not in explicit:
            for k in _CARRIED_TRAINER_KEYS:
                if k in run.trainer:
                    stage.trainer[k] = run.trainer[k]
        for k, v in own.items():  # the stage's explicit overrides stay on top
            OmegaConf.update(stage, k, v, force_add=True)
    return stage


def resolve_dataset(dataset: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A dataset config with what the data decide filled in (a points file's absolute path, so
    every process names the same file; ``event_shape`` and, for points, ``dim=null``: the data's
    own), and its set-up datamodule. ``diffft.train`` resolves the run's data with it before any
    stage starts."""
    if dataset.get("path"):
        dataset["path"] = str(Path(dataset["path"]).expanduser().resolve())
    dm = instantiate(dataset)
    dm.setup("fit")
    if "dim" in dataset:
        dataset["dim"] = dm.dim
    dataset["event_shape"] = list(dm.event_shape)
    return dataset, dm


def _stage_dir(run: DictConfig, stage: DictConfig) -> tuple[str, Path]:
    key = stage_key(stage)
    return key, Path(run.paths.cache_dir) / "pretrain" / f"{stage.task_name}-{key}"


def is_cached(stage_dir: Path) -> bool:
    return (stage_dir / "done").is_file() and (stage_dir / "checkpoints/last.ckpt").is_file()


def cached_stage(run: DictConfig, overrides: list[str], train: Callable[[DictConfig], Any]) -> str:
    """Train the stage ``overrides`` describe for ``run`` with ``train`` (``diffft.train.train``;
    passed in, so that this module does not import the trainer that imports it), or reuse it;
    return its ``last.ckpt``.

    Parallel runs (a sweep, the results scripts) that need the same stage train it once: the
    first takes the stage's lock and trains, the others wait for it and reuse its checkpoint.
    """
    stage = stage_config(run, overrides)
    key, out = _stage_dir(run, stage)
    ckpt = out / "checkpoints" / "last.ckpt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f"{out.name}.lock", f"cached stage {overrides}"):
        if is_cached(out):
            log.info("cached stage %s: reusing %s", overrides, ckpt)
            return str(ckpt)
        log.info("cached stage %s: no cached checkpoint, training into %s", overrides, out)
        if out.exists():  # an interrupted earlier attempt: Lightning would not overwrite its ckpt
            shutil.rmtree(out)
        with open_dict(stage):
            stage.paths.output_dir = str(out)
            stage.paths.cache_dir = run.paths.cache_dir
            stage.threads = run.threads
            stage.trainer.enable_progress_bar = run.trainer.enable_progress_bar
        with single_process():
            train(stage)
        (out / "done").write_text(key)
    return str(ckpt)


# What tells Lightning (and torch.distributed) that a process is one rank of many: set by
# Lightning's DDP launcher for its ranks, by torchrun, and by SLURM in every task of a job.
_RANK_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
_RANK_ENV_PREFIXES = ("MASTER_", "SLURM_", "TORCHELASTIC_", "PL_")


def single_process_env(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """``env`` without the variables that make Lightning start a stage as one rank of a DDP or
    SLURM job (a stage trains on one device, its data unsharded)."""
    return {
        k: v for k, v in env.items() if k not in _RANK_ENV and not k.startswith(_RANK_ENV_PREFIXES)
    }


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Train a stage in this process as a single-process run, even inside a rank of a DDP or
    SLURM job: the rank variables are hidden and Lightning's rank-zero guard set to 0 meanwhile
    (the stage's logs and checkpoints are written). No process group is alive at this point:
    pretraining runs before ``fit``, compare stages after ``train`` has destroyed the group."""
    keep = single_process_env(os.environ)
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k not in keep}
    saved_rank, rank_zero_only.rank = rank_zero_only.rank, 0
    try:
        yield
    finally:
        os.environ.update(hidden)
        rank_zero_only.rank = saved_rank


def compare_stages(cfg: DictConfig) -> dict[str, tuple[str, list[str]]]:
    """``{row id: (label, overrides)}`` of the ``eval.compare`` stages (entries ``{row id:
    {label, overrides}}``). Each is evaluated with this run's settings (eval keys are not part
    of its cache key), so its own summary gives the row without sampling the (e.g. 1000-step)
    chain again. ``eval.compare=null`` drops every row, ``eval.compare.ID=null`` one of them."""
    ev = cfg.eval
    same_eval = [f"eval.{k}={'null' if ev[k] is None else ev[k]}" for k in EVAL_KEYS[:-1]]
    same_eval.append(f"eval.metrics=[{','.join(ev.metrics)}]")
    out = {}
    for row_id, entry in (ev.get("compare") or {}).items():
        if entry is None:
            continue
        if not (isinstance(entry, DictConfig) and "overrides" in entry):
            raise ValueError(
                f"eval.compare.{row_id}: expected {{label: ROW NAME, overrides: [...]}}, "
                f"got {entry}"
            )
        out[row_id] = (entry.get("label") or row_id, [*entry.overrides, *same_eval])
    return out


def start_compare_stages(cfg: DictConfig) -> list[subprocess.Popen]:
    """Train the ``eval.compare`` stages that are not cached yet in background processes (one
    thread each) while this run trains: on a 2-core machine the T=1000 DDPM of ``make run`` then
    costs little wall time. ``report`` waits for them on the stage lock (and trains a stage
    itself if its process failed). Off with ``eval.compare_in_background=false``."""
    if not cfg.eval.compare_in_background:
        return []
    stages = [
        ov
        for _, ov in compare_stages(cfg).values()
        if not is_cached(_stage_dir(cfg, stage_config(cfg, ov))[1])
    ]
    out = Path(cfg.paths.output_dir)
    procs = []
    for i, overrides in enumerate(stages):
        # config.yaml: this run's resolved config, written by train() (data, cache dir, threads)
        cmd = [sys.executable, "-m", "diffft.train_stage", str(out / "config.yaml"), *overrides]
        path = out / f"compare_stage_{i}.log"
        with open(path, "w") as f:
            env = single_process_env(os.environ)
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        log.info("compare stage %s: training in the background (log %s)", overrides, path)
    return procs


def stage_row(
    stage_dir: Path, run: DictConfig, theirs: dict[str, Any], ours: dict[str, Any]
) -> dict[str, list[float]] | None:
    """The main row of a cached stage's summary, when it was evaluated as ``run`` evaluates and
    on the same data (``theirs`` vs ``ours``: data identities, the test split included; else
    None: the row is evaluated again)."""
    summary, config = stage_dir / "summary.json", stage_dir / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    stage_eval = OmegaConf.load(config).eval
    if any(stage_eval.get(k) != run.eval.get(k) for k in EVAL_KEYS):
        return None
    if not same_data(theirs, ours):
        return None
    return main_values(stage_dir)

"""Entry point: ``python -m diffft.train experiment=... [overrides]``.

Builds the datamodule, method, callbacks, logger and trainer from the composed config, runs the
``pretrain`` stage first when a fine-tuning method has no ``init_from`` (cached by config hash),
trains, then evaluates every sampler the method names against the data floor and prints a
summary table. Writes into ``paths.output_dir``: ``config.yaml`` (resolved), ``checkpoints/``
(``last.ckpt``, ``best.ckpt``), ``metrics.csv``, ``samples.png``, ``summary.md``/``.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffft.callbacks.checkpoint import Interrupted, LastCheckpoint
from diffft.callbacks.evaluation import PeriodicEvaluation
from diffft.diffusion.sampler import SOLVERS, Sampler
from diffft.evaluation import METRICS, Evaluator, format_table
from diffft.media import finish, log_config, log_image
from diffft.methods.base import NonFiniteLossError, load_method, read_checkpoint
from diffft.plots import training_curves
from diffft.stages import (
    cached_stage,
    compare_stages,
    data_identity,
    describe_data,
    resolve_dataset,
    same_data,
    stage_config,
    stage_row,
    start_compare_stages,
)

log = logging.getLogger("diffft")


def resolve_data(cfg: DictConfig) -> Any:
    """Build the run's datamodule and write what the data decide back into ``cfg``: the shape of
    one sample (``dataset.event_shape``, which the method is built for; ``dataset.dim=null``
    takes a points file's column count) and the absolute path of a points file, so the saved
    config and every stage name the same data from any directory."""
    resolved, datamodule = resolve_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))
    with open_dict(cfg):
        for key in ("path", "dim", "event_shape"):
            if resolved.get(key) is not None:
                cfg.dataset[key] = resolved[key]
    return datamodule


def check_init_data(method: Any, datamodule: Any) -> None:
    """Warn (one line) when the model a method starts from was trained on other data."""
    init = getattr(method, "init_data", None)
    if init is not None and not same_data(init, datamodule.identity()):
        log.warning(
            "method.init_from: its DDPM was trained on %s, but this run's data are %s",
            describe_data(init),
            describe_data(datamodule.identity()),
        )


def build_trainer(cfg: DictConfig, evaluator: Evaluator) -> L.Trainer:
    out = Path(cfg.paths.output_dir)
    callbacks: list[L.Callback] = []
    if cfg.eval.every_n_batches > 0:
        callbacks.append(
            PeriodicEvaluation(
                evaluator,
                cfg.eval.every_n_batches,
                cfg.eval.periodic_n,
                plot_dir=out / "plots" if cfg.eval.get("periodic_plots") else None,
            )
        )
    for c in (cfg.get("callbacks") or {}).values():
        if not c:
            continue
        if c.get("monitor") and str(c.get("_target_", "")).endswith("ModelCheckpoint"):
            # best.ckpt keeps the best value of the monitored metric: highest for an AUC
            metric = METRICS.get(str(cfg.eval.get("monitor")))
            c = OmegaConf.merge(c, {"mode": metric.better if metric else c.get("mode", "min")})
        callbacks.append(instantiate(c))
    # last.ckpt = the end of training (and of a Ctrl-C), whatever the checkpoint intervals say.
    callbacks.append(LastCheckpoint(out / "checkpoints"))
    if cfg.trainer.get("enable_progress_bar", True):
        # Redrawn every batch, tqdm costs ~0.4 ms of a 2 ms toy step.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=out)


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


def effective_batch(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """What one optimiser step averages over under DDP: every per-rank batch size x ranks."""
    sizes = {"batch_size": cfg.dataset.batch_size}  # dataset.batch_size
    for key, value in cfg.method.items():  # method.rollout_batch, method.generator_batch, ...
        if str(key).endswith("_batch") and isinstance(value, int):
            sizes[str(key)] = value
    return {"world_size": world_size, **{k: v * world_size for k, v in sizes.items()}}


def train(cfg: DictConfig) -> dict[str, dict[str, list[float]]]:
    """Train and evaluate one run; returns ``{sampler or 'data floor': {metric: [values]}}``."""
    torch.set_num_threads(cfg.threads)
    check_requires(cfg)
    datamodule = resolve_data(cfg)  # first: a bad path fails before any stage trains
    check_solvers(cfg)
    check_eval_sizes(cfg)
    check_resume(cfg)
    check_writable(cfg)
    references_for(cfg, datamodule.identity())  # a bad eval.references fails now, not after fit
    evaluator = Evaluator(
        datamodule,
        list(cfg.eval.metrics),
        n=cfg.eval.n,
        draws=cfg.eval.draws,
        seed=cfg.eval.seed,
        w2_points=cfg.eval.w2_points,
        cache_dir=cfg.paths.cache_dir,
        floor_draws=cfg.eval.floor_draws,
        batch_size=cfg.eval.get("batch_size"),
        auc_box=cfg.eval.get("auc_box"),
        features=cfg.eval.get("features", "offline"),
        inception_weights=cfg.eval.get("inception_weights"),
    )
    trainer = build_trainer(cfg, evaluator)
    failed = True
    try:
        rows = fit_and_report(cfg, datamodule, evaluator, trainer)
        failed = False
        return rows
    finally:  # also on failure: the next run of a sweep in this process gets its own W&B run
        finish(trainer.loggers, exit_code=int(failed))


def fit_and_report(
    cfg: DictConfig, datamodule: Any, evaluator: Evaluator, trainer: L.Trainer
) -> dict[str, dict[str, list[float]]]:
    """The part of ``train`` after the trainer exists: config, stages, method, fit, report."""
    out = Path(cfg.paths.output_dir)
    with open_dict(cfg):
        cfg.effective_batch = effective_batch(cfg, trainer.world_size)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        log_config(trainer.loggers, resolved, out / "config.yaml")
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
        method_kwargs["init_from"] = cached_stage(cfg, list(cfg.pretrain.overrides), train)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if needs_encoder_stage(cfg):
        method_kwargs["encoder_from"] = cached_stage(cfg, list(cfg.encoder_stage.overrides), train)
        L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Plain containers: the hyper-parameters in a checkpoint then load with weights_only=True.
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    try:
        method = instantiate(method_cfg, _recursive_=False, _convert_="all", **method_kwargs)
    except InstantiationException as err:  # a config error: the method's own one-line message
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise
    method.data_identity = datamodule.identity()  # saved in its checkpoints
    method.seed = cfg.seed  # with the rank and the batch count: each batch's random stream
    check_init_data(method, datamodule)
    trainer.fit(method, datamodule, ckpt_path=cfg.get("ckpt_path"))
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    if trainer.max_steps == 0:  # (on every rank: save_checkpoint has a barrier)
        # A 0-step run (e.g. released weights as a pretrain stage): Lightning skipped the loop
        # and its hooks, so the checkpoint is written here.
        trainer.save_checkpoint(last.path)
    if dist.is_available() and dist.is_initialized():
        # The evaluation below and any compare stage it trains run outside the process group
        # (a stage inside it would see a shard of the data); the other ranks stop here.
        trainer.strategy.barrier("diffft.train: end of fit")
        dist.destroy_process_group()
    if trainer.global_rank != 0:
        return {}
    # Lightning's teardown leaves the module on the CPU; evaluate on the configured device.
    method.to(cfg.eval.get("device") or trainer.strategy.root_device)
    if method.batches_done == 0 and last.path.is_file():  # ddp_spawn: trained in the workers
        ckpt = torch.load(last.path, map_location="cpu", weights_only=False)
        method.batches_done = ckpt.get("diffft_batches_done", 0)
    try:
        return report(cfg, method, datamodule, evaluator, out, trainer.loggers)
    finally:
        for proc in background:  # normally finished: report() waited for their stage locks
            proc.wait()


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


def needs_encoder_stage(cfg: DictConfig) -> bool:
    """Whether the method wants the encoder stage's checkpoint (the contrastive chain with
    ``method.encoder=trained|random`` and an empty ``method.encoder_from``)."""
    if "encoder_from" not in cfg.method or cfg.method.encoder_from:
        return False
    if cfg.method.get("encoder") not in ("trained", "random"):
        return False
    if not cfg.get("encoder_stage") or not cfg.encoder_stage.overrides:
        raise ValueError(
            "method.encoder_from is empty and no encoder stage is configured; set "
            "method.encoder_from=PATH/last.ckpt (a checkpoint of python -m diffft.train_encoder) "
            "or encoder_stage.overrides"
        )
    return True


def report(
    cfg: DictConfig,
    method: Any,
    datamodule: Any,
    evaluator: Evaluator,
    out: Path,
    loggers: list[Any] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Evaluate every sampler of ``method`` (plus any extra ``eval.compare`` checkpoints) beside
    the floor; print and save the table and a scatter plot."""
    method.eval()
    samplers = dict(method.samplers())
    if not samplers:  # e.g. an encoder run: nothing samples, so there is no table to make
        note = f"{cfg.task_name}: this method has no sampler rows; nothing to evaluate"
        (out / "summary.md").write_text(note + "\n")
        (out / "summary.json").write_text("{}")
        print(f"\n{note}\n\noutputs: {out}\n", flush=True)
        return {}
    # Extra rows: other models (e.g. the full-chain DDPM, a strong-schedule baseline), each
    # trained once by its own cached stage. A null entry removes a row an experiment inherited.
    stage_rows: dict[str, dict[str, list[float]] | None] = {}
    stage_models: dict[str, tuple[str, Any]] = {}
    ours = datamodule.identity()
    for row_id, (name, overrides) in compare_stages(cfg).items():
        ckpt = cached_stage(cfg, overrides, train)
        stage_dir = Path(ckpt).parents[1]
        theirs = data_identity(OmegaConf.load(stage_dir / "config.yaml").dataset)
        if not same_data(theirs, ours):  # only when the stage's own overrides chose other data
            log.warning(
                "eval.compare %r: trained on %s, but this run's data are %s",
                name,
                describe_data(theirs),
                describe_data(ours),
            )
        stage_models[row_id] = (name, load_method(ckpt).eval().to(method.device))
        samplers[name] = stage_models[row_id][1].eval_chain
        stage_rows[name] = stage_row(stage_dir, cfg, theirs, ours)
    samplers.update(solver_rows(cfg, method, stage_models))
    samplers.update(best_checkpoint_row(cfg, method, out))
    todo = [name for name in samplers if not stage_rows.get(name)]
    # Rows in parallel threads (torch and POT release the GIL; each row has its own seeded
    # generators, so the numbers do not change): ~40% less wall time on two cores.
    energies = method.energies()  # rows whose energy the energy metrics (AUC) score
    with ThreadPoolExecutor(max(1, cfg.eval.get("workers") or 1)) as pool:
        values = pool.map(lambda n: evaluator.evaluate(samplers[n], energy=energies.get(n)), todo)
        evaluated = dict(zip(todo, values, strict=True))
    rows = {name: stage_rows.get(name) or evaluated[name] for name in samplers}
    rows["data floor"] = evaluator.floor()
    table = format_table(rows, evaluator.metrics, references_for(cfg, ours), evaluator.labels())
    header = (
        f"{cfg.task_name}: {evaluator.draws} draws of {evaluator.n} samples, mean ± sd; "
        f"'data floor' = the same metric between independent real samples of the same size "
        f"({evaluator.floor_draws} draws)"
    )
    (out / "summary.md").write_text(header + "\n\n" + table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    n_shown = 5_000 if len(datamodule.event_shape) == 1 else 64  # a scatter, or a 8x8 grid
    with torch.no_grad():
        shown = {
            name: s.sample(n_shown, generator=torch.Generator(s.device).manual_seed(cfg.eval.seed))
            for name, s in samplers.items()
        }
    datamodule.plot(shown, out / "samples.png")
    log_image(loggers or [], "samples/final", out / "samples.png", step=method.batches_done)
    main = next(iter(shown.values()))
    for path in method.extra_plots(out, datamodule.train, main):  # e.g. DxMI's energy and values
        log_image(loggers or [], f"samples/{path.stem}", path, step=method.batches_done)
    try:  # losses and diagnostics; a plot must not cost the run its table
        training_curves(out / "metrics.csv", out / "training.png")
    except Exception as err:  # noqa: BLE001
        log.warning("training.png not written: %s: %s", type(err).__name__, err)
    print("\n" + header + "\n" + table + f"\n\noutputs: {out}\n", flush=True)
    return rows


def best_checkpoint_row(cfg: DictConfig, method: Any, out: Path) -> dict[str, Sampler]:
    """With ``eval.best_row``, the main sampler of ``checkpoints/best.ckpt`` (the best periodic
    ``eval.monitor`` value, as both papers select their checkpoint) as an extra row, when it is
    not the end of training. Its selection used the periodic evaluations against the same
    reference data, so it is optimistic; the row's name says so."""
    best = out / "checkpoints" / "best.ckpt"
    if not cfg.eval.get("best_row") or not best.is_file():
        return {}
    chosen = load_method(str(best))
    if chosen.batches_done == method.batches_done:
        return {}
    name, sampler = next(iter(chosen.eval().to(method.device).samplers().items()))
    label = f"{name} (best.ckpt: best periodic {cfg.eval.monitor}, batch {chosen.batches_done})"
    return {label: sampler}


def solver_rows(
    cfg: DictConfig, method: Any, stage_models: dict[str, tuple[str, Any]]
) -> dict[str, Sampler]:
    """The training-free solver rows (``eval.solvers``): each of ``kinds`` (``ddim``,
    ``dpmpp2m``) run for ``steps`` steps on the DDPM of the compare row ``source`` (null: this
    run's own DDPM), labelled with the model they come from (``check_solvers`` has checked
    the spec)."""
    spec = cfg.eval.get("solvers")
    if not spec or not spec.get("kinds"):
        return {}
    # check_solvers validated the spec before training; a source row dropped by the run's
    # config (eval.compare.ID=null) drops its solver rows too.
    if spec.get("source") is None:
        label, ddpm = "", method
    elif spec.source in stage_models:
        label, ddpm = stage_models[spec.source]
    else:
        log.info("eval.solvers: row %r dropped, so are the solver rows", spec.source)
        return {}
    out: dict[str, Sampler] = {}
    for kind in spec.kinds:
        solver = ddpm.solver(int(spec.steps), kind)
        out[f"{solver.label}, {label}" if label else solver.label] = solver
    return out


def check_solvers(cfg: DictConfig) -> None:
    """Check ``eval.solvers`` before anything trains (its rows are built at the very end)."""
    spec = cfg.eval.get("solvers")
    if not spec or not spec.get("kinds"):
        return
    unknown = [k for k in spec.kinds if k not in SOLVERS]
    if unknown:
        raise ValueError(f"eval.solvers.kinds: unknown {unknown}; expected from {sorted(SOLVERS)}")
    steps = spec.get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"eval.solvers.steps={steps!r}; expected an int >= 1")
    if spec.get("source") is None:
        if "schedule" not in cfg.method:
            raise ValueError(
                "eval.solvers.source is null but this run is not a DDPM; name an eval.compare "
                "row id (e.g. ddpm_full) whose DDPM the solvers run on"
            )
        T = cfg.method.schedule.steps
    else:
        compare = compare_stages(cfg)
        if spec.source not in compare:
            if spec.source in (cfg.eval.get("compare") or {}) or not cfg.eval.get("compare"):
                return  # its row was dropped: so are the solver rows
            raise ValueError(
                f"eval.solvers.source={spec.source!r} is not an eval.compare row id (known: "
                f"{sorted(compare)}); name one, or null for this run's own DDPM"
            )
        T = stage_config(cfg, compare[spec.source][1]).method.schedule.steps
    if "ddim" in spec.kinds and T % steps:
        raise ValueError(
            f"eval.solvers: ddim needs eval.solvers.steps={steps} to divide the source DDPM's "
            f"T={T} (diffusers' DDIM steps by T // steps); use eval.solvers.kinds=[dpmpp2m]"
        )


# The eval sizes checked before training: (key, what it counts, what null means; None: no null).
EVAL_SIZES = (
    ("n", "samples per evaluation draw", None),
    ("draws", "independent evaluation draws", None),
    ("floor_draws", "the data floor's draws", "= eval.draws"),
    ("w2_points", "points of the exact W2 metric", None),
    ("batch_size", "samples per sampler call", "all eval.n at once"),
)


def check_eval_sizes(cfg: DictConfig) -> None:
    """Check the eval sizes before anything trains: a 0 or negative one fails only at the
    final evaluation (an empty sample: no key named), or evaluates nothing and reports empty
    rows; ``eval.periodic_n`` is checked when the periodic evaluation is on."""
    sizes = list(EVAL_SIZES)
    if cfg.eval.every_n_batches > 0:
        sizes.append(("periodic_n", "samples per periodic evaluation", None))
    for key, what, null in sizes:
        value = cfg.eval.get(key)
        if value is None and null:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fix = f" or null ({null})" if null else ""
            raise ValueError(f"eval.{key}={value}: expected an int >= 1 ({what}){fix}")


def references_for(cfg: DictConfig, identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``eval.references`` when the run's data are those the references were measured on
    (every key of ``eval.reference_data`` matches the data's identity; null = any data) and
    the run is the setup they were measured with (every dotted key of ``eval.reference_when``,
    e.g. ``method.schedule.name: sigmoid``, has that value)."""
    # Read with get, as every optional key: `~eval.references` (no paper column) is allowed.
    node = cfg.eval.get("references")
    refs = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    on = cfg.eval.get("reference_data")
    if on is not None and any(identity.get(k) != v for k, v in on.items()):
        return {}
    when = cfg.eval.get("reference_when") or {}
    if any(OmegaConf.select(cfg, k) != v for k, v in when.items()):
        return {}
    return refs


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


@hydra.main(version_base="1.3", config_path="pkg://diffft.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    check_overrides(list(hydra_cfg.overrides.task))
    check_launch(cfg, hydra_cfg.mode)
    if hydra_cfg.mode == RunMode.RUN and hydra_cfg.sweeper.get("params"):
        log.warning(  # Hydra applies hydra.sweeper.params only in MULTIRUN mode
            "a sweep config without -m ignores its hydra.sweeper.params and runs the config as "
            "composed from the command line: add -m to run the sweep"
        )
    try:
        train(cfg)
    except (NonFiniteLossError, Interrupted) as err:  # one line, not a traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        if hydra_cfg.mode == RunMode.MULTIRUN and isinstance(err, NonFiniteLossError):
            raise  # an Exception: Hydra records this job as failed, the sweep goes on
        raise SystemExit(130 if isinstance(err, Interrupted) else 1) from None


if __name__ == "__main__":
    main()

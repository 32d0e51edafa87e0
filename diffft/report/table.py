"""The final table of a run: every row (the method's own, compare stages, solvers, the best
checkpoint) evaluated against the data floor, printed and saved with a plot of samples."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffft.evaluation import Evaluator, format_table
from diffft.media import log_image
from diffft.methods.base import load_method
from diffft.plots import training_curves
from diffft.report.references import references_for
from diffft.report.stages import (
    cached_stage,
    compare_stages,
    data_identity,
    describe_data,
    same_data,
    stage_row,
)
from diffft.report.summary import FLOOR, as_label_keys, write_summary
from diffft.rows import Row, check_unique

log = logging.getLogger("diffft")


def build_evaluator(cfg: DictConfig, datamodule: Any) -> Evaluator:
    """The run's evaluator (final table and periodic evaluations) from the ``eval`` node."""
    ev = cfg.eval
    return Evaluator(
        datamodule,
        list(ev.metrics),
        n=ev.n,
        draws=ev.draws,
        seed=ev.seed,
        w2_points=ev.w2_points,
        cache_dir=cfg.paths.cache_dir,
        floor_draws=ev.floor_draws,
        batch_size=ev.get("batch_size"),
        auc_box=ev.get("auc_box"),
        features=ev.get("features", "offline"),
        inception_weights=ev.get("inception_weights"),
    )


def report(
    cfg: DictConfig,
    method: Any,
    datamodule: Any,
    evaluator: Evaluator,
    runner: Any,
    loggers: list[Any] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Evaluate every row beside the floor; print and save the table (``summary.md``,
    ``summary.json``, ``rows.json``) and the plots. ``runner`` trains a compare stage that is
    not cached (``diffft.train.train``). Returns ``{row label or 'data floor': {metric:
    values}}``."""
    out = Path(cfg.paths.output_dir)
    method.eval()
    rows = method.rows()
    if not rows:  # e.g. an encoder run: nothing samples, so there is no table to make
        note = f"{cfg.task_name}: this method has no sampler rows; nothing to evaluate"
        (out / "summary.md").write_text(note + "\n")
        write_summary(out, {}, [])
        print(f"\n{note}\n\noutputs: {out}\n", flush=True)
        return {}
    ours = datamodule.identity()
    known: dict[str, dict[str, list[float]]] = {}  # rows read from a cached stage's summary
    compare, models = compare_rows(cfg, method, ours, runner, known)
    rows = [*rows, *compare, *solver_rows(cfg, method, compare, models)]
    rows += best_checkpoint_row(cfg, method)
    check_unique(rows)
    todo = [r for r in rows if r.id not in known]
    # Rows in parallel threads (torch and POT release the GIL; each row has its own seeded
    # generators, so the numbers do not change): ~40% less wall time on two cores.
    with ThreadPoolExecutor(max(1, cfg.eval.get("workers") or 1)) as pool:
        values = pool.map(lambda r: evaluator.evaluate(r.sampler, energy=r.energy), todo)
        known.update({r.id: v for r, v in zip(todo, values, strict=True)})
    table = {r.label: known[r.id] for r in rows}
    table[FLOOR] = evaluator.floor()
    refs = references_for(OmegaConf.to_container(cfg, resolve=True), ours)
    refs = as_label_keys(refs, {r.id: r.label for r in rows})
    text = format_table(table, evaluator.metrics, refs, evaluator.labels())
    header = (
        f"{cfg.task_name}: {evaluator.draws} draws of {evaluator.n} samples, mean ± sd; "
        f"'data floor' = the same metric between independent real samples of the same size "
        f"({evaluator.floor_draws} draws)"
    )
    (out / "summary.md").write_text(header + "\n\n" + text + "\n")
    write_summary(out, table, [{"id": r.id, "label": r.label, "role": r.role} for r in rows])
    plot_rows(cfg, method, datamodule, rows, out, loggers or [])
    print("\n" + header + "\n" + text + f"\n\noutputs: {out}\n", flush=True)
    return table


def plot_rows(
    cfg: DictConfig, method: Any, datamodule: Any, rows: list[Row], out: Path, loggers: list[Any]
) -> None:
    """``samples.png`` (every row), the method's own figures and ``training.png``."""
    n_shown = 5_000 if len(datamodule.event_shape) == 1 else 64  # a scatter, or a 8x8 grid
    with torch.no_grad():
        shown = {
            r.label: r.sampler.sample(
                n_shown, generator=torch.Generator(r.sampler.device).manual_seed(cfg.eval.seed)
            )
            for r in rows
        }
    datamodule.plot(shown, out / "samples.png")
    log_image(loggers, "samples/final", out / "samples.png", step=method.batches_done)
    main = shown[next(r.label for r in rows if r.role == "main")]
    for path in method.extra_plots(out, datamodule.train, main):  # e.g. DxMI's energy and values
        log_image(loggers, f"samples/{path.stem}", path, step=method.batches_done)
    try:  # losses and diagnostics; a plot must not cost the run its table
        training_curves(out / "metrics.csv", out / "training.png")
    except Exception as err:  # noqa: BLE001
        log.warning("training.png not written: %s: %s", type(err).__name__, err)


def compare_rows(
    cfg: DictConfig,
    method: Any,
    ours: dict[str, Any],
    runner: Any,
    known: dict[str, dict[str, list[float]]],
) -> tuple[list[Row], dict[str, Any]]:
    """The ``eval.compare`` rows: other models (e.g. the full-chain DDPM, a strong-schedule
    baseline), each trained once by its own cached stage on this run's data; a stage's own
    summary row is reused (into ``known``) when it was evaluated as this run evaluates. Returns
    the rows and their models by row id (the solver rows run on them)."""
    out, models = [], {}
    for row_id, (label, overrides) in compare_stages(cfg).items():
        ckpt = cached_stage(cfg, overrides, runner)
        stage_dir = Path(ckpt).parents[1]
        theirs = data_identity(OmegaConf.load(stage_dir / "config.yaml").dataset)
        if not same_data(theirs, ours):  # only when the stage's own overrides chose other data
            log.warning(
                "eval.compare %r: trained on %s, but this run's data are %s",
                row_id,
                describe_data(theirs),
                describe_data(ours),
            )
        models[row_id] = load_method(ckpt).eval().to(method.device)
        out.append(Row(row_id, label, models[row_id].eval_chain, role="compare"))
        reused = stage_row(stage_dir, cfg, theirs, ours)
        if reused:
            known[row_id] = reused
    return out, models


def solver_rows(
    cfg: DictConfig, method: Any, compare: list[Row], models: dict[str, Any]
) -> list[Row]:
    """The training-free solver rows (``eval.solvers``): each of ``kinds`` (``ddim``,
    ``dpmpp2m``; row id = the kind) run for ``steps`` steps on the DDPM of the compare row
    ``source`` (null: this run's own DDPM), labelled with the model they come from."""
    spec = cfg.eval.get("solvers")
    if not spec or not spec.get("kinds"):
        return []
    if spec.get("source") is None:
        label, ddpm = "", method
    else:
        row = next((r for r in compare if r.id == spec.source), None)
        if row is None:  # its compare row was dropped (eval.compare.ID=null): so are these
            log.info("eval.solvers: row %r dropped, so are the solver rows", spec.source)
            return []
        label, ddpm = row.label, models[row.id]
    out = []
    for kind in spec.kinds:
        solver = ddpm.solver(int(spec.steps), kind)
        name = f"{solver.label}, {label}" if label else solver.label
        out.append(Row(kind, name, solver, role="solver"))
    return out


def best_checkpoint_row(cfg: DictConfig, method: Any) -> list[Row]:
    """With ``eval.best_row``, the main row of ``checkpoints/best.ckpt`` (the best periodic
    ``eval.monitor`` value, as both papers select their checkpoint) as an extra row, when it is
    not the end of training. Its selection used the periodic evaluations against the same
    reference data, so it is optimistic; the label says so."""
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    if not cfg.eval.get("best_row") or not best.is_file():
        return []
    chosen = load_method(str(best))
    if chosen.batches_done == method.batches_done:
        return []
    row = chosen.eval().to(method.device).main_row()
    when = f"best periodic {cfg.eval.monitor}, batch {chosen.batches_done}"
    label = f"{row.label} (best.ckpt: {when})"
    return [Row("best", label, row.sampler, role="best")]

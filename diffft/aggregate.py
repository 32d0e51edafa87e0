"""Aggregate a Hydra sweep of ``python -m diffft.train -m ...``: one table per configuration,
with every metric pooled over seeds and evaluation draws.

``python -m diffft.aggregate MULTIRUN_DIR [--by k,k] [--over k,k] [--format md|csv]
[--metrics m,m] [--one-table] [--out FILE]``

``--se`` (with ``--one-table``): ``mean ± s.e.`` over runs instead of ``± sd`` over draws.
``--one-table``: one markdown table for the whole sweep (the ``--by`` values as the first
columns, each distinct data floor once at the end), as the result files show it; otherwise one
table per configuration. The ``reference`` column holds the runs' ``eval.references`` (paper
values) when their data are ``eval.reference_data``.

A run is a directory holding ``config.yaml`` (resolved) and ``summary.json``
(``{row: {metric: [one value per draw]}}``). Runs are grouped by their ``--by`` values and
pooled over everything else (the ``--over`` keys, default ``seed``). The default ``--by`` is
every config leaf present in all runs whose value differs between them, except:

- the ``--over`` keys, keys under ``paths.`` and ``hydra.``, and ``ckpt_path``;
- keys equal to the run's ``seed`` in every run (interpolated copies of the seed);
- string keys that contain the run's own output directory in every run (``paths.output_dir``
  or the run directory: e.g. ``logger.save_dir``, ``callbacks.model_checkpoint.dirpath``,
  which differ per job of a sweep but do not define a configuration).

Within a group, identical value lists of a row in several runs count once: the data floor
(the same for runs on the same data and eval settings) and rows read from a cached stage are
not weighted by the number of seeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from diffft.report.references import reference_text, references_for
from diffft.report.summary import FLOOR, as_label_keys, labels_by_id

EXCLUDED_PREFIXES = ("paths.", "hydra.")
FOOTER = (
    "mean ± sd over all evaluation draws of all runs (seeds × draws); runs = runs pooled; "
    "the data floor counts identical floors once"
)
FOOTER_SE = (
    "mean ± s.e. over runs (each run's draws averaged first; s.e. = sd of the run means / "
    "sqrt(runs); '± nan' = one run); the data floor: mean ± sd over its draws"
)


@dataclass
class RowStats:
    """One row of a group: per metric the pooled ``mean``, ``sd`` (ddof=1) and number of
    values ``n``; ``runs`` = runs pooled (identical value lists counted once)."""

    mean: dict[str, float] = field(default_factory=dict)
    sd: dict[str, float] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    # the standard error over runs: sd of the runs' own means (each over its draws) / sqrt(runs)
    se: dict[str, float] = field(default_factory=dict)


@dataclass
class Group:
    """The runs of one configuration: ``key`` = its ``--by`` values, ``rows`` by row name."""

    key: dict[str, Any]
    rows: dict[str, RowStats]
    references: dict[str, str] = field(default_factory=dict)
    features: str | None = None  # eval.features of its first run (names the image metrics)


def metric_labels(groups: list[Group], metrics: list[str]) -> list[str]:
    """Column labels, as the runs' own summaries name them: an image metric's label names
    the feature network of the runs' ``eval.features`` (``FID vs test (offline features)``)."""
    from diffft.evaluation import METRICS, metric_label  # torch: only when a table is printed

    features = "/".join(sorted({g.features for g in groups if g.features})) or None
    return [metric_label(m, features) if m in METRICS else m for m in metrics]


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_runs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) with ``config.yaml`` and
    ``summary.json``, in natural order (``2`` before ``10``); skips cached stages (a ``done``
    file) and anything under ``.cache``. None found: ``SystemExit``."""
    root = Path(root)
    runs = [
        p.parent
        for p in root.rglob("config.yaml")
        if (p.parent / "summary.json").is_file()
        and not (p.parent / "done").exists()
        and ".cache" not in p.parent.relative_to(root).parts
    ]
    if not runs:
        raise SystemExit(
            f"no run directories (config.yaml + summary.json) under {root}; "
            "pass the sweep dir of a `python -m diffft.train -m ...`"
        )
    return sorted(runs, key=lambda p: _natural(p.relative_to(root)))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested dict; lists (and empty dicts) as their string repr."""
    if not isinstance(cfg, dict) or (not cfg and prefix):
        return {prefix[:-1]: repr(cfg) if isinstance(cfg, list | dict) else cfg}
    return {k: v for key, sub in cfg.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}


def load_config(run: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as dotted leaf keys."""
    return flatten(OmegaConf.to_container(OmegaConf.load(run / "config.yaml")))


def references(run: Path) -> dict[str, str]:
    """``{row label: "source value, ..."}`` from a run's ``eval.references`` (keyed by row id;
    the run's ``rows.json`` gives each id its label), by the rule of its own table
    (``diffft.report.references``; the data are judged by the run's ``dataset`` node)."""
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    refs = references_for(cfg, cfg.get("dataset") or {})
    return {k: reference_text(v) for k, v in as_label_keys(refs, labels_by_id(run)).items()}


def default_by(runs: list[Path], configs: list[dict[str, Any]], over: tuple[str, ...]) -> list[str]:
    """The keys that define a configuration (the rule in the module docstring)."""

    def derived(key: str) -> bool:
        if key == "seed":
            return False
        values = [
            (c.get(key), c.get("seed"), c.get("paths.output_dir"), r)
            for c, r in zip(configs, runs, strict=True)
        ]
        if all(v == s and not isinstance(v, bool) for v, s, _, _ in values):
            return True
        return all(
            isinstance(v, str) and any(d and d in v for d in (out, str(r.resolve())))
            for v, _, out, r in values
        )

    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [
        k
        for k in keys
        if k not in over
        and k != "ckpt_path"
        and not k.startswith(EXCLUDED_PREFIXES)
        and all(k in c for c in configs)
        and len({repr(c[k]) for c in configs}) > 1
        and not derived(k)
    ]


def aggregate(
    runs: list[Path],
    by: list[str] | None = None,
    over: tuple[str, ...] | list[str] = ("seed",),
    metrics: list[str] | None = None,
) -> list[Group]:
    """Group ``runs`` by their ``by`` values (default: ``default_by``), in order of first
    appearance, and pool each row's values of ``metrics`` (default: the metrics of the runs'
    main rows) over the group's runs and draws."""
    configs = [load_config(r) for r in runs]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    by = default_by(runs, configs, tuple(over)) if by is None else list(by)
    for key in by:
        for cfg, run in zip(configs, runs, strict=True):
            if key not in cfg:
                raise SystemExit(f"--by {key}: no such key in {run / 'config.yaml'}")
    if metrics is None:  # the main rows' metrics, in order of first appearance
        mains = [next((v for k, v in s.items() if k != FLOOR), {}) for s in summaries]
        metrics = list(dict.fromkeys(m for main in mains for m in main))
    grouped: dict[tuple[str, ...], list[tuple[dict[str, Any], dict]]] = {}
    for cfg, summary in zip(configs, summaries, strict=True):
        grouped.setdefault(tuple(repr(cfg[k]) for k in by), []).append((cfg, summary))
    groups = []
    for members in grouped.values():
        names = list(dict.fromkeys(n for _, s in members for n in s if n != FLOOR))
        names += [FLOOR] if any(FLOOR in s for _, s in members) else []
        rows = {}
        for name in names:
            distinct = []  # identical value lists (floor, cached stage rows) count once
            for row in (s[name] for _, s in members if name in s):
                if row not in distinct:
                    distinct.append(row)
            stats = RowStats(runs=len(distinct))
            for m in metrics:
                values = np.array([v for row in distinct for v in row.get(m, [])], dtype=float)
                stats.n[m] = len(values)
                stats.mean[m] = float(values.mean()) if len(values) else float("nan")
                stats.sd[m] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
                means = np.array([np.mean(row[m]) for row in distinct if row.get(m)], dtype=float)
                k = len(means)
                stats.se[m] = float(means.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
            rows[name] = stats
        groups.append(Group({k: members[0][0][k] for k in by}, rows))
    first = {}  # the first run of each group (and its config), for its references
    for cfg, run in zip(configs, runs, strict=True):
        first.setdefault(tuple(repr(cfg[k]) for k in by), (cfg, run))
    for group, (cfg, run) in zip(groups, first.values(), strict=True):
        group.references = references(run)
        group.features = cfg.get("eval.features")
    return groups


def _cell(s: RowStats, m: str, stat: str = "sd") -> str:
    """``mean ± sd`` (or ``± s.e.`` with ``stat="se"``), or ``–`` where the row has no values
    of ``m`` (e.g. a metric of another dataset in a sweep over datasets)."""
    spread = s.se[m] if stat == "se" else s.sd[m]
    return f"{s.mean[m]:.4g} ± {spread:.2g}" if s.n.get(m) else "–"


def _metrics(groups: list[Group]) -> list[str]:
    return list(next(iter(groups[0].rows.values())).mean) if groups and groups[0].rows else []


def format_md(groups: list[Group], root: str | Path, n_runs: int, over: list[str]) -> str:
    """Markdown: a header line, then per group a ``### key=value`` heading (when there are
    ``--by`` keys) and a table ``model | metric ... | runs`` of ``mean ± sd``; a footer."""
    metrics = _metrics(groups)
    by = list(groups[0].key) if groups else []
    lines = [f"{root}: {n_runs} runs; by: {', '.join(by) or '-'}; over: {', '.join(over)}"]
    head = ["model", *metric_labels(groups, metrics), "runs"]
    for group in groups:
        lines.append("")
        if group.key:
            lines += ["### " + ", ".join(f"{k}={v}" for k, v in group.key.items()), ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, s in group.rows.items():
            cells = [_cell(s, m) for m in metrics]
            lines.append("| " + " | ".join([name, *cells, str(s.runs)]) + " |")
    return "\n".join([*lines, "", FOOTER]) + "\n"


def format_one_table(
    groups: list[Group], root: str | Path, n_runs: int, over: list[str], stat: str = "sd"
) -> str:
    """Markdown: one table ``<by keys> | model | metric ... | runs | reference`` over every
    group, each distinct data floor once at the end (``stat``: ``sd`` over draws, or ``se``:
    the standard error over runs)."""
    metrics = _metrics(groups)
    by = list(groups[0].key) if groups else []
    lines = [f"{root}: {n_runs} runs; by: {', '.join(by) or '-'}; over: {', '.join(over)}", ""]
    head = [*by, "model", *metric_labels(groups, metrics)]
    lines += [
        "| " + " | ".join([*head, "runs", "reference"]) + " |",
        "|" + "---|" * (len(head) + 2),
    ]
    floors: list[RowStats] = []
    for group in groups:
        for name, s in group.rows.items():
            cells = [_cell(s, m, stat) for m in metrics]
            if name == FLOOR:
                if all(f.mean != s.mean for f in floors):
                    floors.append(s)
                continue
            ref = group.references.get(name, "–")
            keys = [str(v) for v in group.key.values()]
            lines.append("| " + " | ".join([*keys, name, *cells, str(s.runs), ref]) + " |")
    for s in floors:
        row = [*([""] * len(by)), FLOOR]
        row += [_cell(s, m, "sd") for m in metrics] + [str(s.runs), "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join([*lines, "", FOOTER_SE if stat == "se" else FOOTER]) + "\n"


def format_csv(groups: list[Group]) -> str:
    """CSV, one line per (group, row): the ``--by`` keys, ``model``, ``<metric>_mean``,
    ``<metric>_sd`` per metric, ``runs``, ``n_values`` (the most values of any metric)."""
    metrics = _metrics(groups)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    by = list(groups[0].key) if groups else []
    writer.writerow(
        [*by, "model", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd"))]
        + ["runs", "n_values"]
    )
    for group in groups:
        for name, s in group.rows.items():
            stats = [x for m in metrics for x in (s.mean[m], s.sd[m])]
            n = max(s.n.values(), default=0)
            writer.writerow([*group.key.values(), name, *stats, s.runs, n])
    return buf.getvalue()


def _keys(text: str | None) -> list[str] | None:
    return None if text is None else [k.strip() for k in text.split(",") if k.strip()]


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffft.aggregate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", metavar="MULTIRUN_DIR")
    parser.add_argument("--by", help="keys defining a configuration (default: see above)")
    parser.add_argument("--over", default="seed", help="keys averaged over (default: seed)")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--metrics", help="metric names (default: the runs' main rows')")
    parser.add_argument("--one-table", action="store_true", help="one md table for the sweep")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument(
        "--se", action="store_true", help="--one-table: ± the standard error over runs, not sd"
    )
    args = parser.parse_args(argv)
    runs = find_runs(args.root)
    over = _keys(args.over) or []
    groups = aggregate(runs, by=_keys(args.by), over=over, metrics=_keys(args.metrics))
    if args.format == "md":
        if args.one_table:
            text = format_one_table(groups, args.root, len(runs), over, "se" if args.se else "sd")
        else:
            text = format_md(groups, args.root, len(runs), over)
    else:
        text = format_csv(groups)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

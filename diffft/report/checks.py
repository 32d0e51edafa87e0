"""Checks of the table's config (the ``eval`` node) made before anything trains: its rows are
built at the very end of a run, so a mistake found there would cost the whole training."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from diffft.diffusion.sampler import SOLVERS
from diffft.report.references import references_for
from diffft.report.stages import compare_stages, stage_config

# The eval node's schema: every key the report layer reads (conf/train.yaml declares each one
# with its default and meaning; a test keeps the two in step).
EVAL_KEYS = (
    "metrics", "n", "draws", "floor_draws", "seed", "w2_points", "every_n_batches", "periodic_n",
    "periodic_plots", "device", "monitor", "references", "reference_data", "reference_when",
    "workers", "auc_box", "features", "inception_weights", "batch_size", "solvers", "best_row",
    "compare_in_background", "compare",
)  # fmt: skip

# The eval sizes checked before training: (key, what it counts, what null means; None: no null).
EVAL_SIZES = (
    ("n", "samples per evaluation draw", None),
    ("draws", "independent evaluation draws", None),
    ("floor_draws", "the data floor's draws", "= eval.draws"),
    ("w2_points", "points of the exact W2 metric", None),
    ("batch_size", "samples per sampler call", "all eval.n at once"),
)


def check_eval(cfg: DictConfig, identity: dict) -> None:
    """Every check of the ``eval`` node: known keys, sizes, solver rows, references."""
    check_eval_keys(cfg)
    check_eval_sizes(cfg)
    check_solvers(cfg)
    references_for(OmegaConf.to_container(cfg, resolve=True), identity)


def check_eval_keys(cfg: DictConfig) -> None:
    """A misspelled eval key (in an experiment file, or added with ``+eval.KEY=``) is an error
    naming it, not a setting that silently does nothing."""
    unknown = sorted(set(cfg.eval) - set(EVAL_KEYS))
    if unknown:
        close = {k: [e for e in EVAL_KEYS if e[:3] == k[:3]] for k in unknown}
        hint = "; ".join(f"eval.{k} (did you mean {', '.join(v)}?)" for k, v in close.items() if v)
        raise ValueError(
            f"unknown eval keys {['eval.' + k for k in unknown]}{': ' + hint if hint else ''}; "
            f"known: {', '.join(EVAL_KEYS)}"
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


def check_solvers(cfg: DictConfig) -> None:
    """Check ``eval.solvers`` (``{source: compare row id or null, steps, kinds}``)."""
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
        method = cfg.method
    else:
        compare = compare_stages(cfg)
        if spec.source not in compare:
            if spec.source in (cfg.eval.get("compare") or {}) or not cfg.eval.get("compare"):
                return  # its row was dropped: so are the solver rows
            raise ValueError(
                f"eval.solvers.source={spec.source!r} is not an eval.compare row id (known: "
                f"{sorted(compare)}); name one, or null for this run's own DDPM"
            )
        method = stage_config(cfg, compare[spec.source][1]).method
    T = get_class(method._target_).ddpm_steps(OmegaConf.to_container(method, resolve=True))
    if T is None:
        raise ValueError(
            "eval.solvers.source is null but this run is not a DDPM; name an eval.compare "
            "row id (e.g. ddpm_full) whose DDPM the solvers run on"
        )
    if "ddim" in spec.kinds and T % steps:
        raise ValueError(
            f"eval.solvers: ddim needs eval.solvers.steps={steps} to divide the source DDPM's "
            f"T={T} (diffusers' DDIM steps by T // steps); use eval.solvers.kinds=[dpmpp2m]"
        )

"""How many draws the data floor needs: ``python experiments/floor_draws.py [--draws 100]``.

Computes the swiss-roll floor of each metric (a fresh 10K real sample vs the metric's reference
split, the train config's eval settings, no cache) with ``--draws`` draws, and prints its mean,
sd and range beside what the first 3 / 5 draws alone would report. The numbers behind
``eval.floor_draws`` (``conf/train.yaml``, ``diffft/evaluation.py``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from diffft.evaluation import Evaluator


def evaluator(dataset: str) -> Evaluator:
    """The default train config's ``Evaluator`` on ``dataset`` (no floor cache)."""
    with initialize_config_module("diffft.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={dataset}"])
    dm = instantiate(cfg.dataset)
    dm.setup()
    ev = cfg.eval
    return Evaluator(
        dm, list(ev.metrics), n=ev.n, draws=ev.draws, seed=ev.seed, w2_points=ev.w2_points
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--dataset", default="swiss_roll")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ev = evaluator(args.dataset)
    ev.floor_draws, ev.cache_dir = args.draws, None
    for name, values in ev.floor().items():
        v = np.asarray(values)
        print(
            f"{name:9s} {len(v)} draws: {v.mean():.4g} ± {v.std(ddof=1):.2g} "
            f"(range {v.min():.4g}-{v.max():.4g}); first 3: {v[:3].mean():.4g} ± "
            f"{v[:3].std(ddof=1):.2g}; first 5: {v[:5].mean():.4g} ± {v[:5].std(ddof=1):.2g}"
        )


if __name__ == "__main__":
    main()

"""``python -m diffft.train_stage RUN_CONFIG OVERRIDE...``: train one cached stage.

``diffft.report.stages.start_compare_stages`` runs this in the background for the ``eval.compare``
stages of a run (``RUN_CONFIG`` = that run's resolved ``config.yaml``: its data, backbone, cache
dir, debug stage settings, threads). The stage lock makes the run wait for it before it builds
its table.
"""

from __future__ import annotations

import logging
import sys

import torch
from hydra import initialize_config_module
from omegaconf import OmegaConf, open_dict

from diffft.report.stages import cached_stage
from diffft.train import train


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m diffft.train_stage RUN_CONFIG OVERRIDE...")
    logging.basicConfig(level=logging.INFO)
    run = OmegaConf.load(argv[0])
    with open_dict(run):
        run.trainer.enable_progress_bar = False  # a log file, not a terminal
    torch.set_num_threads(run.threads)
    with initialize_config_module("diffft.conf", version_base="1.3"):
        print(cached_stage(run, argv[1:], train), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

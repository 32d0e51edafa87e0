"""Hydra launchers: ``hardware=slurm`` (hydra-submitit-launcher) composes and writes the sbatch
script its ``hardware.*`` keys describe; submitit's local executor and joblib run real sweeps."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
DEBUG_RUN = ["experiment=swiss_roll_ddpm", "debug=fast", "trainer.enable_progress_bar=false"]


def run_train(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m diffft.train ARGS`` in ``tmp_path``; with ``check``, a failure fails the test
    with the tail of its output and of the submitit job logs."""
    env = {**os.environ, "DIFFFT_CACHE": str(tmp_path / "cache"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "diffft.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode:
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("sweep/.submitit/**/*.err")))
        pytest.fail(f"diffft.train {args} failed:\n{(proc.stdout + proc.stderr + logs)[-4000:]}")
    return proc


def test_slurm_config_composes():
    overrides = ["hardware=slurm", "hardware.partition=gpu", "hardware.nodes=2"]
    overrides += ["hardware.gpus_per_node=4", "hardware.time_min=30", "hardware.mem_gb=32"]
    overrides += ["hardware.cpus_per_task=6", "+hardware.additional.mail-type=END"]
    with initialize_config_module("diffft.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        assert trainer["accelerator"] == "gpu"
        assert (trainer["devices"], trainer["num_nodes"]) == (4, 2)
        assert trainer["strategy"]["_target_"].endswith("DDPStrategy")
        assert trainer["strategy"]["find_unused_parameters"] is True
        assert trainer["precision"] == "32-true"
        # Every trainer key is a Trainer argument (the hardware node stays out of it).
        assert set(trainer) - {"_target_"} <= set(inspect.signature(L.Trainer).parameters)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert launcher["_target_"] == SLURM_LAUNCHER
        expected = {"partition": "gpu", "nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4}
        expected |= {"timeout_min": 30, "mem_gb": 32, "cpus_per_task": 6}
        assert {k: launcher[k] for k in expected} == expected
        assert launcher["additional_parameters"] == {"mail-type": "END"}
        assert launcher["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
        # The other hardware options are unchanged: no hardware node, their own trainer keys.
        cpu = compose("train", overrides=["hardware=cpu"])
        assert "hardware" not in cpu and cpu.trainer.accelerator == "cpu"
        assert cpu.trainer.devices == 1 and "strategy" not in cpu.trainer


def test_slurm_sweep_writes_sbatch_script(tmp_path):
    """The real CLI path with stand-in ``srun``/``sbatch``: one array job, one task per GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    captured = tmp_path / "sbatch.sh"
    sbatch = f'#!/bin/sh\nfor a; do last=$a; done\ncp "$last" {captured}\nexit 0\n'
    (bin_dir / "sbatch").write_text(sbatch)  # no job id printed: submitit stops after submitting
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    args = ["-m", "hardware=slurm", "hardware.partition=gpu", "hardware.nodes=2"]
    args += ["hardware.gpus_per_node=4", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = run_train(tmp_path, *args, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=False)
    assert "Could not make sense of sbatch output" in proc.stderr, proc.stderr[-2000:]
    script = captured.read_text()
    for flag in ["--array=0-1", "--partition=gpu", "--nodes=2", "--gpus-per-node=4"]:
        assert f"#SBATCH {flag}" in script
    for flag in ["--ntasks-per-node=4", "--cpus-per-task=8", "--mem=64GB", "--time=240"]:
        assert f"#SBATCH {flag}" in script
    assert f"{tmp_path}/sweep/.submitit/" in script and "srun " in script


def test_submitit_local_run(tmp_path):
    run_train(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *DEBUG_RUN,
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    job = tmp_path / "sweep" / "0"
    assert json.loads((job / "summary.json").read_text())
    assert (job / "checkpoints" / "last.ckpt").is_file()


def test_joblib_parallel_sweep(tmp_path):
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *DEBUG_RUN]
    run_train(tmp_path, *args, f"hydra.sweep.dir={tmp_path}/sweep")
    for num in (0, 1):
        assert (tmp_path / "sweep" / str(num) / "summary.json").is_file()
    seeds = {OmegaConf.load(tmp_path / f"sweep/{n}/config.yaml").seed for n in (0, 1)}
    assert seeds == {0, 1}


SWEEPS = sorted(
    p.name.removesuffix(".yaml")
    for p in (resources.files("diffft.conf") / "sweep").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_results_sweep_composes_each_of_its_points(sweep):
    """Each results sweep (conf/sweep/) names its parameters, and the first and last point of
    its grid compose (a typo in a swept key or value fails here, not after an hour)."""
    with initialize_config_module("diffft.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={sweep}"], return_hydra_config=True)
        params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
        assert params and str(cfg.hydra.sweep.dir).startswith(f"multirun/{sweep}/")
        for pick in (0, -1):
            point = [f"{k}={v[pick]}" for k, v in params.items()]
            job = compose("train", overrides=[f"sweep={sweep}", *point])
            assert job.task_name != "train"  # the swept experiment was applied

"""W&B offline: a run directory with the resolved config, scalar curves and sample images."""

from pathlib import Path

import yaml

from diffft.train import train


def test_wandb_offline_run_has_the_config_and_sample_images(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(
        "experiment=swiss_roll_ddpm",
        "debug=fast",
        "trainer.max_steps=4",
        "logger=wandb",
        "logger.group=unit",
        "logger.tags=[test]",
        "eval.periodic_plots=true",
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    (run,) = (out / "wandb").glob("offline-run-*")
    (log,) = run.glob("*.wandb")  # the scalar history, config and media, for `wandb sync`
    assert b"effective_batch" in log.read_bytes()  # the resolved run config went to the run
    config = yaml.safe_load((run / "files" / "diffft_config.yaml").read_text())
    assert config["task_name"] == "swiss_roll_ddpm" and config["eval"]["n"] == cfg.eval.n
    assert config["effective_batch"]["world_size"] == 1
    images = sorted(p.name for p in (run / "files" / "media" / "images").rglob("*.png"))
    assert any(n.startswith("samples/final") or "final" in n for n in images), images
    assert sum("periodic" in n for n in images) == 2, images  # steps 2 and 4
    assert (out / "plots" / "step_0000002.png").is_file()

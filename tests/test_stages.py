"""The stage rule: cached stages (pretraining, compare rows) train on the run's data."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffft.checks import check_overrides
from diffft.report.stages import compare_stages, stage_config, stage_key
from diffft.train import train


def helix(n: int = 2000, seed: int = 0) -> np.ndarray:
    """A 3-D helix: a shape and a dimension the project does not ship."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 4 * np.pi, n)
    return np.stack([np.cos(s), np.sin(s), s / 6], 1) + 0.05 * rng.standard_normal((n, 3))


def test_stage_config_takes_the_runs_data_and_keeps_its_own_explicit_keys(make_cfg, tmp_path):
    np.save(tmp_path / "helix.npy", helix())
    run = make_cfg(
        "experiment=swiss_roll_sft_pg", "dataset=points_file", "dataset.test_fraction=0.3"
    )
    run.dataset.path = str(tmp_path / "helix.npy")
    stage = stage_config(run, ["experiment=swiss_roll_ddpm", "dataset.seed=3"])
    assert stage.dataset.name == "points_file" and stage.dataset.path == run.dataset.path
    assert (
        stage.dataset.seed == 3 and stage.dataset.test_fraction == 0.3
    )  # explicit on top, rest carried
    assert stage.method.event_shape == [3]  # the carried dataset.event_shape, from the file
    full = stage_config(run, ["experiment=swiss_roll_ddpm_full", "backbone=sinusoidal_mlp"])
    assert full.backbone._target_.endswith("SinusoidalTimeMLP")
    assert full.dataset.batch_size == 256  # the stage's recipe, not the run's 128
    implicit = stage_config(run, ["experiment=swiss_roll_ddpm_full"])
    assert implicit.backbone._target_.endswith(".TimeMLP")  # the run's backbone carries
    roll = stage_config(make_cfg("experiment=swiss_roll_sft_pg"), ["experiment=swiss_roll_ddpm"])
    assert roll.dataset.name == "swiss_roll"
    assert stage_key(roll) != stage_key(stage_config(run, ["experiment=swiss_roll_ddpm"]))
    more = make_cfg("experiment=swiss_roll_sft_pg", "trainer.devices=2")
    assert stage_key(stage_config(more, ["experiment=swiss_roll_ddpm"])) == stage_key(roll)


def test_a_points_file_run_trains_every_stage_on_that_file(make_cfg, tmp_path):
    common = ["experiment=swiss_roll_sft_pg_fast", "debug=fast"]
    roll = train(make_cfg(*common, f"paths.output_dir={tmp_path}/roll"))
    cache = Path(make_cfg().paths.cache_dir) / "pretrain"
    roll_stages = {p.parent for p in cache.glob("*/config.yaml")}
    np.save(tmp_path / "helix.npy", helix())
    cfg = make_cfg(*common, "dataset=points_file", f"dataset.path={tmp_path}/helix.npy")
    rows = train(cfg)
    out = Path(cfg.paths.output_dir)
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.dataset.dim == 3 and saved.method.event_shape == [3]  # inferred from the file
    new_stages = {p.parent for p in cache.glob("*/config.yaml")} - roll_stages
    compare = [v.label for v in cfg.eval.compare.values() if v is not None]
    assert len(new_stages) == 1 + len(compare)  # pretraining + every compare row, all retrained
    for stage in new_stages:
        stage_cfg = OmegaConf.load(stage / "config.yaml")
        assert stage_cfg.dataset.path == str(tmp_path / "helix.npy")
        assert stage_cfg.method.event_shape == [3]
    for name in compare:
        assert rows[name] != roll[name]  # not the swiss-roll stage's summary row
    summary = (out / "summary.md").read_text()
    assert "paper" not in summary  # the references were measured on swiss roll
    assert "SFT-PG paper" in (tmp_path / "roll/summary.md").read_text()


def test_init_from_other_data_warns_and_other_dimension_fails(make_cfg, tmp_path, caplog):
    ddpm = make_cfg("experiment=swiss_roll_ddpm", "debug=fast", f"paths.output_dir={tmp_path}/d")
    train(ddpm)
    ckpt = f"{tmp_path}/d/checkpoints/last.ckpt"
    ring = np.random.default_rng(0).normal(size=(500, 2))
    np.save(tmp_path / "ring.npy", ring / np.linalg.norm(ring, axis=1, keepdims=True))
    np.save(tmp_path / "helix.npy", helix(500))
    common = ["experiment=swiss_roll_sft_pg", "debug=fast", "eval.compare=null"]
    common += [f"method.init_from={ckpt}", "dataset=points_file"]
    with caplog.at_level(logging.WARNING, logger="diffft"):
        train(make_cfg(*common, f"dataset.path={tmp_path}/ring.npy"))
    (line,) = [r.getMessage() for r in caplog.records if "method.init_from" in r.getMessage()]
    assert "swiss_roll" in line and "ring.npy" in line
    match = r"DDPM of samples of shape \[2\], but this run's data have shape \[3\]"
    with pytest.raises(ValueError, match=match):
        train(make_cfg(*common, f"dataset.path={tmp_path}/helix.npy"))


def test_compare_rows_are_dropped_by_null_and_an_empty_dict_is_refused(make_cfg):
    rows = train(make_cfg("experiment=swiss_roll_sft_pg_fast", "debug=fast", "eval.compare=null"))
    assert set(rows) == {"SFT-PG T'=10", "DDPM T'=10 (init)", "data floor"}
    one = make_cfg("experiment=swiss_roll_sft_pg", "eval.compare.ddpm_full=null")
    assert list(compare_stages(one)) == ["ddpm_cosine"]
    with pytest.raises(ValueError, match="eval.compare=null"):
        check_overrides(["experiment=swiss_roll_sft_pg", "eval.compare={}"])


def test_train_runs_from_another_directory(tmp_path):
    # conf/ is installed as the package diffft.conf: no config path relative to the checkout.
    out = subprocess.run(
        [sys.executable, "-m", "diffft.train", "experiment=swiss_roll_sft_pg_fast", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "task_name: swiss_roll_sft_pg_fast" in out and "SinusoidalTimeMLP" not in out


def test_the_cache_key_follows_the_training_data_only(make_cfg, tmp_path):
    pre = ["experiment=swiss_roll_ddpm"]
    key = lambda *o: stage_key(stage_config(make_cfg("experiment=swiss_roll_sft_pg", *o), pre))  # noqa: E731
    assert key() == key("dataset.metrics=[sw]") == key("dataset.n_test=2000")
    assert key() != key("dataset.n_train=5000") != key("dataset.seed=1")
    np.save(tmp_path / "a.npy", helix())
    np.save(tmp_path / "b.npy", helix())  # the same points in another file
    files = [f"dataset.path={tmp_path}/{f}.npy" for f in "ab"]
    assert key("dataset=points_file", files[0]) == key("dataset=points_file", files[1])


def test_bad_solver_rows_fail_before_training(make_cfg, monkeypatch):
    import diffft.report.stages as stages

    monkeypatch.setattr(stages, "cached_stage", lambda *a: pytest.fail("trained a stage"))
    cfg = make_cfg("experiment=swiss_roll_sft_pg", "debug=fast", "method.sampler.steps=3")
    with pytest.raises(ValueError, match="ddim needs eval.solvers.steps=3 to divide .* T=1000"):
        train(cfg)
    with pytest.raises(ValueError, match="eval.solvers.kinds: unknown \\['heun'\\]"):
        train(make_cfg("experiment=swiss_roll_sft_pg", "debug=fast", "eval.solvers.kinds=[heun]"))


def test_paper_references_print_only_for_their_data_and_setup(make_cfg):
    from diffft.report.references import references_for as by_id

    def references_for(cfg, identity):
        return by_id(OmegaConf.to_container(cfg, resolve=True), identity)

    roll = {"name": "swiss_roll", "n_train": 10000, "n_test": 10000, "seed": 0}
    cfg = make_cfg("experiment=swiss_roll_ddpm")
    assert "ddpm_T10" in references_for(cfg, roll)  # the paper's sigmoid setup, its data
    assert references_for(cfg, {**roll, "seed": 1}) == {}  # other data
    cosine = make_cfg("experiment=swiss_roll_ddpm", "method.schedule.name=cosine")
    assert references_for(cosine, roll) == {}  # another setup: its rows print '–'
    # Deleting the key (a paper number that does not apply to the row) must not fail the
    # report: it raised ConfigAttributeError there, after the whole run had trained.
    dropped = make_cfg("experiment=eight_gaussians_sft_pg", "~eval.references")
    assert references_for(dropped, {**roll, "name": "eight_gaussians"}) == {}

"""The report layer: typed rows, references by row id, the include-list stage key, the eval
schema, the output-directory claim, and the layering (no import circle)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from diffft.report.checks import EVAL_KEYS, check_eval_keys
from diffft.report.references import references_for
from diffft.report.stages import stage_config, stage_key
from diffft.report.summary import read_rows
from diffft.rows import Row, check_unique, main_row

ROOT = Path(__file__).resolve().parents[1]


def test_rows_have_one_main_row_and_unique_ids():
    rows = [Row("a", "A", None), Row("init", "I", None, role="init")]
    assert main_row(rows).id == "a"
    with pytest.raises(ValueError, match="exactly one main row"):
        main_row([Row("a", "A", None, role="init")])
    with pytest.raises(ValueError, match="duplicate ids \\['a'\\]"):
        check_unique([*rows, Row("a", "B", None, role="variant")])
    with pytest.raises(ValueError, match="role 'trained'"):
        Row("a", "A", None, role="trained")


def test_each_methods_rows_have_stable_ids(make_cfg):
    from hydra.utils import instantiate

    from diffft.train import resolve_data

    cfg = make_cfg("experiment=swiss_roll_ddpm", "method.eval_steps=[{steps: 5}]")
    resolve_data(cfg)
    ddpm = instantiate(OmegaConf.to_container(cfg.method, resolve=True), _recursive_=False)
    rows = ddpm.rows()
    assert [(r.id, r.role) for r in rows] == [
        ("ddpm_T10", "main"),
        ("ddpm_T10_to5_uniform", "variant"),
    ]
    assert rows[0].label == "DDPM T=10"  # labels are for display; the ids key references


def test_references_are_keyed_by_row_id_and_labels_are_display_only(make_cfg):
    roll = {"name": "swiss_roll", "n_train": 10000, "n_test": 10000, "seed": 0}
    cfg = OmegaConf.to_container(make_cfg("experiment=swiss_roll_sft_pg"), resolve=True)
    refs = references_for(cfg, roll)
    assert set(refs) == {"sft_pg", "init", "ddpm_full"}
    # another T': the papers' T' = 10 numbers do not apply
    four = make_cfg("experiment=swiss_roll_sft_pg", "method.sampler.steps=4")
    assert references_for(OmegaConf.to_container(four, resolve=True), roll) == {}
    with pytest.raises(ValueError, match="eval.references: expected"):
        references_for({"eval": {"references": {"sft_pg": 0.64}}}, roll)


def test_every_experiments_references_name_rows_that_exist():
    """A reference keyed by a label (the old way) or a misspelled id would silently vanish."""
    ids = {"sft_pg", "sft_pathwise", "dxmi", "dxdp", "contrastive", "init", "best", "ddim"}
    ids |= {"dpmpp2m", "ddpm_full"}
    for path in sorted((ROOT / "conf/experiment").glob("*.yaml")):
        ev = (yaml.safe_load(path.read_text()) or {}).get("eval") or {}
        compare = set((ev.get("compare") or {}).keys())
        for row_id in ev.get("references") or {}:
            ok = row_id in ids | compare or row_id.startswith("ddpm_T")
            assert ok, f"{path.name}: eval.references.{row_id} names no row id"


def test_stage_key_is_an_include_list(make_cfg):
    """A key that does not define the stage (a new top-level key, eval, logging, devices)
    never changes its key; the method, data, training steps and seed do."""
    base = make_cfg("experiment=swiss_roll_sft_pg")
    stage = lambda run: stage_config(run, ["experiment=swiss_roll_ddpm"])  # noqa: E731
    key = stage_key(stage(base))
    other = stage(base)
    with open_dict(other):
        other.some_new_key = {"a": 1}
        other.eval.n = 7
        other.trainer.devices = 4
        other.task_name = "renamed"
        other.threads = 2
    assert stage_key(other) == key
    for change in ("seed=1", "method.schedule.steps=20", "trainer.max_steps=7"):
        changed = stage(make_cfg("experiment=swiss_roll_sft_pg"))
        k, _, v = change.partition("=")
        OmegaConf.update(changed, k, yaml.safe_load(v))
        assert stage_key(changed) != key, change
    batch = stage(base)
    batch.dataset.batch_size = 64
    assert stage_key(batch) != key


def test_eval_schema_names_a_misspelled_key(make_cfg):
    cfg = make_cfg("experiment=swiss_roll_sft_pg")
    with open_dict(cfg):
        cfg.eval.floor_draw = 3
    with pytest.raises(ValueError, match="unknown eval keys \\['eval.floor_draw'\\].*floor_draws"):
        check_eval_keys(cfg)


def test_eval_schema_matches_the_root_config():
    root = yaml.safe_load((ROOT / "conf/train.yaml").read_text())
    assert tuple(root["eval"]) == EVAL_KEYS


def test_an_output_directory_held_by_a_running_run_is_refused(tmp_path):
    """Two runs started into one folder (e.g. the same second): the second stops with one line
    instead of overwriting the first one's files."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "from pathlib import Path; from diffft.checks import "
         f"claim_output_dir; claim_output_dir(Path('{out}')); print('held', flush=True); "
         "import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        from diffft.checks import claim_output_dir

        with pytest.raises(ValueError, match="is in use by another run"):
            claim_output_dir(out)
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(out)  # free again once the other run has ended


def test_rows_json_ties_labels_to_ids_and_old_runs_still_read(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"A": {}, "B": {}, "data floor": {}}))
    assert [r["id"] for r in read_rows(tmp_path)] == ["A", "B"]  # before rows.json: labels
    assert read_rows(tmp_path)[0]["role"] == "main"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("diffft")}


def test_layers_import_downwards_only():
    """Data and nets import nothing from methods; methods nothing from the report layer or the
    command lines; the report layer never imports the trainer (it gets a runner)."""
    pkg = ROOT / "diffft"
    clis = {"diffft.train", "diffft.sample", "diffft.score", "diffft.aggregate"}
    clis |= {"diffft.train_stage", "diffft.train_encoder"}
    for path in pkg.rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = _imports(path)
        if mod.startswith(("diffft.data", "diffft.nets")):
            assert not any(d.startswith("diffft.methods") for d in deps), (mod, deps)
        if mod.startswith(("diffft.methods", "diffft.diffusion", "diffft.data", "diffft.nets")):
            assert not any(d.startswith("diffft.report") for d in deps), (mod, deps)
            assert not deps & clis, (mod, deps)
        if mod.startswith("diffft.report"):
            assert not deps & clis, (mod, deps)


def test_a_users_mistake_is_one_line_and_a_non_terminal_log_has_no_bars(tmp_path):
    cmd = [sys.executable, "-m", "diffft.train", "dataset=points_file"]
    cmd += [f"dataset.path={tmp_path}/missing.npy", f"hydra.run.dir={tmp_path}/o"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "HYDRA_FULL_ERROR"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith("error: ") and "missing.npy" in errors[0]


def test_line_progress_logs_a_line_per_epoch_not_a_bar(make_cfg, caplog):
    from diffft.train import train

    cfg = make_cfg("experiment=swiss_roll_ddpm", "debug=fast", "trainer.enable_progress_bar=true")
    cfg.trainer.max_steps = 2 * 79  # two epochs of 10K points in batches of 128
    cfg.eval.every_n_batches = 0
    with caplog.at_level("INFO", logger="diffft"):
        train(cfg)  # pytest's stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert lines and lines[-1].startswith("batch 158/158 (epoch 2)"), lines
    assert len(lines) <= 2


def test_sample_and_score_leave_no_log_file_in_the_working_directory(tmp_path):
    for cli in ("sample", "score"):
        cmd = [sys.executable, "-m", f"diffft.{cli}", f"ckpt={tmp_path}/missing.ckpt"]
        cmd += [f"out={tmp_path}/out.npy"] + ([f"in={tmp_path}/p.npy"] if cli == "score" else [])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode != 0 and "no such file" in done.stderr
        assert not list(tmp_path.glob("*.log")), f"diffft.{cli} left {list(tmp_path.glob('*.log'))}"

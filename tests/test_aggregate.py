"""diffft.aggregate: fake runs (grouping, pooling, floor dedupe, csv, errors) and a real sweep."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffft.aggregate import aggregate, find_runs, format_csv, main

LRS, SEEDS = (0.1, 0.2), (0, 1)


def fake_summary(lr, seed):
    main_row = {
        "sw": [lr + seed + 0.01 * d for d in range(3)],
        "w2": [10 * lr - seed + 0.5 * d for d in range(3)],
    }
    # lr=0.1: the same floor for both seeds; lr=0.2: two different floors.
    floor = {"sw": [0.5, 0.7 + (seed if lr == 0.2 else 0)], "w2": [1.0, 2.0]}
    rows = {"M": main_row}
    if seed == 1:
        rows["extra"] = {"sw": [lr], "w2": [2 * lr]}
    rows["data floor"] = floor
    return rows


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for job, (lr, seed) in enumerate((lr, s) for lr in LRS for s in SEEDS):
        run = root / str(job)
        run.mkdir(parents=True)
        cfg = {
            "seed": seed,
            "method": {"lr": lr, "seed": seed, "steps": [1, 2]},
            "paths": {"output_dir": str(run)},
            "logger": {"save_dir": str(run)},
            "ckpt_path": None,
        }
        OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
        (run / "summary.json").write_text(json.dumps(fake_summary(lr, seed)))
    # Not runs: a cached stage (done file), anything under .cache, a config without summary.
    for skipped in (root / "stage", root / ".cache" / "x", root / "nosummary"):
        skipped.mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"seed": 5}), skipped / "config.yaml")
        if skipped.name != "nosummary":
            (skipped / "summary.json").write_text(json.dumps(fake_summary(0.3, 5)))
    (root / "stage" / "done").touch()
    return root


def test_fake_sweep_groups_pools_and_formats(sweep, tmp_path, capsys):
    runs = find_runs(sweep)
    assert runs == [sweep / str(j) for j in range(4)]
    groups = aggregate(runs)
    assert [g.key for g in groups] == [{"method.lr": 0.1}, {"method.lr": 0.2}]
    for group, lr in zip(groups, LRS, strict=True):
        assert list(group.rows) == ["M", "extra", "data floor"]
        rows = [fake_summary(lr, s) for s in SEEDS]
        for m in ("sw", "w2"):
            pooled = rows[0]["M"][m] + rows[1]["M"][m]
            stats = group.rows["M"]
            assert stats.mean[m] == pytest.approx(np.mean(pooled))
            assert stats.sd[m] == pytest.approx(np.std(pooled, ddof=1))
            assert stats.n[m] == 6 and stats.runs == 2
            extra = group.rows["extra"]
            assert extra.runs == 1 and extra.n[m] == 1 and np.isnan(extra.sd[m])
        floor = group.rows["data floor"]
        if lr == 0.1:  # identical floors count once
            assert floor.runs == 1 and floor.n["sw"] == 2
            assert floor.mean["sw"] == pytest.approx(0.6)
        else:
            pooled = rows[0]["data floor"]["sw"] + rows[1]["data floor"]["sw"]
            assert floor.runs == 2 and floor.n["sw"] == 4
            assert floor.sd["sw"] == pytest.approx(np.std(pooled, ddof=1))

    # Without grouping keys: one group of all four runs; --metrics picks the columns.
    (single,) = aggregate(runs, by=[], metrics=["w2"])
    assert single.key == {} and list(single.rows["M"].mean) == ["w2"]
    assert (
        single.rows["M"].runs == 4 and single.rows["data floor"].runs == 2
    )  # 0.1 and (0.2, 0) share one

    parsed = list(csv.DictReader(io.StringIO(format_csv(groups))))
    assert [(r["method.lr"], r["model"]) for r in parsed] == [
        (str(lr), name) for lr in LRS for name in ("M", "extra", "data floor")
    ]
    assert float(parsed[0]["sw_mean"]) == pytest.approx(groups[0].rows["M"].mean["sw"])
    assert parsed[0]["runs"] == "2" and parsed[0]["n_values"] == "6"

    out = tmp_path / "table.md"
    main([str(sweep), "--out", str(out)])
    text = capsys.readouterr().out
    assert text == out.read_text()
    assert "4 runs; by: method.lr; over: seed" in text.splitlines()[0]
    assert "### method.lr=0.1" in text and "### method.lr=0.2" in text
    assert "| model | SW2 1000 proj vs test | exact W2 vs test (x1e-2) | runs |" in text
    mu, sd = np.mean(rows[0]["M"]["sw"] + rows[1]["M"]["sw"]), groups[1].rows["M"].sd["sw"]
    assert f"| M | {mu:.4g} ± {sd:.2g} |" in text
    assert text.rstrip().endswith("the data floor counts identical floors once")

    main([str(sweep), "--format", "csv", "--over", "seed", "--by", "method.lr"])
    assert capsys.readouterr().out == format_csv(groups)

    # One table: the --by value as a column, each distinct floor once at the end (lr=0.1's
    # floor, then lr=0.2's pooled one), no references in these configs.
    main([str(sweep), "--one-table"])
    lines = capsys.readouterr().out.splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0].startswith("| method.lr | model | SW2 1000 proj vs test |")
    assert table[0].endswith("| runs | reference |")
    assert [ln.split(" | ")[:2] for ln in table[1:]] == [
        ["| 0.1", "M"],
        ["| 0.1", "extra"],
        ["| 0.2", "M"],
        ["| 0.2", "extra"],
        ["| ", "data floor"],
        ["| ", "data floor"],
    ]
    assert f"| 0.2 | M | {mu:.4g} ± {sd:.2g} |" in "\n".join(table)


def test_errors(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no run directories .* under .*empty"):
        find_runs(tmp_path / "empty")
    with pytest.raises(SystemExit, match=r"--by method\.nope: no such key in .*0/config\.yaml"):
        aggregate(find_runs(sweep), by=["method.nope"])


def test_real_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "DIFFFT_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "diffft.train",
        "-m",
        "experiment=swiss_roll_ddpm",
        "debug=fast",
        "seed=0,1",
        "method.schedule.steps=5,10",
        f"hydra.sweep.dir={sweep}",
        "trainer.enable_progress_bar=false",
    ]
    try:
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{' '.join(cmd)} failed:\n{err.stderr[-3000:]}")
    runs = find_runs(sweep)
    assert len(runs) == 4
    groups = aggregate(runs)
    assert [g.key for g in groups] == [{"method.schedule.steps": 5}, {"method.schedule.steps": 10}]
    for group in groups:
        members = [
            json.loads((r / "summary.json").read_text())
            for r in runs
            if OmegaConf.load(r / "config.yaml").method.schedule.steps
            == group.key["method.schedule.steps"]
        ]
        assert len(members) == 2
        assert list(group.rows) == list(members[0])  # e.g. DDPM T=5, data floor
        main_row = next(iter(members[0]))
        for m, value in group.rows[main_row].mean.items():
            assert value == pytest.approx(
                np.mean(members[0][main_row][m] + members[1][main_row][m])
            )
        assert group.rows[main_row].runs == 2
        assert group.rows["data floor"].runs == 1  # same data and eval settings: one floor
    main([str(sweep), "--format", "md"])
    text = capsys.readouterr().out
    assert "### method.schedule.steps=5" in text and "### method.schedule.steps=10" in text
    assert "| DDPM T=5 |" in text and "| DDPM T=10 |" in text and "| data floor |" in text


def test_standard_error_over_runs(sweep, capsys):
    groups = aggregate(find_runs(sweep), by=["method.lr"])
    (group,) = [g for g in groups if g.key["method.lr"] == 0.1]
    # run means of M's sw: seed 0 -> 0.11, seed 1 -> 1.11; s.e. = sd / sqrt(2)
    means = np.array([0.1 + 0.01, 1.1 + 0.01])
    assert group.rows["M"].se["sw"] == pytest.approx(means.std(ddof=1) / np.sqrt(2))
    assert np.isnan(group.rows["extra"].se["sw"])  # one run
    main([str(sweep), "--one-table", "--se", "--by", "method.lr"])
    out = capsys.readouterr().out
    assert "mean ± s.e. over runs" in out
    assert f"| 0.1 | M | 0.61 ± {means.std(ddof=1) / np.sqrt(2):.2g} |" in out


def test_image_metric_columns_name_the_runs_feature_network(tmp_path, capsys):
    # An image sweep: the FID / KID columns are labelled as the runs' own summaries label
    # them (this printed 'FID vs test ({features})' before).
    root = tmp_path / "images"
    for seed in (0, 1):
        run = root / str(seed)
        run.mkdir(parents=True)
        cfg = {"seed": seed, "eval": {"features": "offline"}, "paths": {"output_dir": str(run)}}
        OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
        rows = {
            "M": {"fid": [10.0 + seed], "kid": [1.0]},
            "data floor": {"fid": [5.0], "kid": [0.0]},
        }
        (run / "summary.json").write_text(json.dumps(rows))
    for args in (["--one-table", "--se"], []):
        main([str(root), *args])
        out = capsys.readouterr().out
        assert "FID vs test (offline features) | KID vs test (offline features)" in out
        assert "{features}" not in out

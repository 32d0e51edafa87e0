"""``experiments/bench.py --quick``: every part runs from a fresh checkout (nothing cached) and
prints its ratio line. A smoke test: its numbers are not measurements."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("step", "quality", "sft_step", "sft_e2e", "dxmi_step", "images", "memory", "ddp")
# About a minute of its own processes, two DDP ranks among them: on the DDP tests' pytest worker
# (their process groups never run at once), beside the rest of the suite.
pytestmark = pytest.mark.xdist_group("ddp")


def test_quick_bench_runs_every_part_and_prints_its_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"  # not experiments/results/
    cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in PARTS:
        assert re.search(rf"^{part}: .*\bratio\b", proc.stdout, re.M), f"no ratio line: {part}"
    assert "ratio" in out.read_text()
    assert not list(tmp_path.glob("lightning_logs"))  # nothing written where it was started

"""The GPU benchmark runs end to end on its tiny CPU config: it is run where a GPU is lent,
rarely and against a clock, so a script broken since its last run would cost that run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("plain forward", "block outputs -> zarr", "block outputs, copied only",
        "block outputs, last token", "attention maps -> zarr", "attention maps, copied only")


def test_the_gpu_benchmark_runs_its_cpu_smoke_config_and_profiles_each_row(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_capture.py"), "--cpu-smoke",
         "--trials", "1", "--store", str(tmp_path), "--profile", str(tmp_path / "profiles")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for row in ROWS:
        line = next((line for line in lines if line.startswith(row + " ")), None)
        assert line is not None, (row, done.stdout)
        ratios = re.findall(r"(\d+\.\d+)x", line)
        assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), line  # total, batches
        assert line.rstrip().endswith("ms"), line  # the model thread's CPU time
    assert any(line.startswith("target: block outputs -> zarr") for line in lines)
    profiles = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    assert len(profiles) == len(ROWS) - 1, profiles  # every capture row, not the plain one
    assert all("function calls" in (tmp_path / "profiles" / name).read_text()
               for name in profiles)
    assert [p.name for p in tmp_path.iterdir()] == ["profiles"]  # its stores deleted

"""The step benchmark runs end to end on tiny inputs and records environment + timings (no numbers asserted)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"


def test_bench_step_writes_a_csv_row(tiny_run_overrides, tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--steps", "2", "--warmup", "1", "--csv", str(out), *tiny_run_overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "device=" in proc.stdout and "commit=" in proc.stdout and "img_per_s" in proc.stdout
    (row,) = list(csv.DictReader(out.open()))
    for column in ("device", "torch", "commit", "date", "img_per_s", "teacher_ms", "student_fwd_bwd_ms"):
        assert row[column], column
    assert float(row["img_per_s"]) > 0

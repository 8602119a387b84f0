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


BENCH_FEATURE_LOSS = BENCH.parent / "bench_feature_loss.py"


def test_bench_feature_loss_writes_rows_report_plot_and_summary_lines(tmp_path):
    out = tmp_path / "feature_loss.csv"
    args = ["--quick", "--batch", "1", "--reps", "2", "--no-compile", "--modes", "fwd,full", "--csv", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH_FEATURE_LOSS), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 * 2  # 4 paper levels + the 4-level call, two modes, one provider on CPU
    for column in ("device", "torch", "triton", "commit", "date", "ms_p50", "gbps", "pct_peak", "vs_eager"):
        assert rows[0][column], column
    assert float(rows[0]["ms_p50"]) > 0 and float(rows[0]["gbps"]) > 0
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 0
    summary = [line for line in proc.stdout.splitlines() if line.startswith("provider=")]
    assert len(summary) == len(rows)
    assert summary[0].split()[0] == "provider=eager" and [f.split("=")[0] for f in summary[0].split()] == [
        "provider", "mode", "shape", "ms", "gbps", "pct_peak", "vs_eager", "vs_compiled"
    ]  # fmt: skip
    if rows[0]["device"].startswith("cpu"):
        assert "Triton kernel needs CUDA" in proc.stdout

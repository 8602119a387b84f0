"""The attention benchmark runs end to end on CPU in --quick mode and writes CSV, markdown, plot, summary lines."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"


def test_bench_attention_quick_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--csv", str(tmp_path / "bench_attention_cpu.csv")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "device=" in proc.stdout and "commit=" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "bench_attention_cpu.csv").open()))
    measured = {r["provider"] for r in rows if r["tflops"]}
    assert {"sdpa", "sdpa-math", "eager-math"} <= measured
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert triton_rows and all(r["note"].startswith("not measurable") for r in triton_rows)
    assert (tmp_path / "bench_attention_cpu.md").read_text().startswith("# Attention benchmark (CPU)")
    assert (tmp_path / "bench_attention_cpu.png").stat().st_size > 0
    summary = [line for line in proc.stdout.splitlines() if line.startswith("provider=")]
    assert len(summary) == len(rows) and "mode=fwd tflops=" in summary[0]


def test_past_its_deadline_it_stops_after_one_case_and_writes_it(tmp_path):
    """The GPU suite's deadline ($DTENGINE_BENCH_DEADLINE, here already past) stops new cases, not the report."""
    csv_path = tmp_path / "bench_attention_cpu.csv"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--csv", str(csv_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DTENGINE_BENCH_DEADLINE": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "time limit (DTENGINE_BENCH_DEADLINE) reached: stopped before case SD-512 D40" in proc.stdout
    assert {r["case"] for r in csv.DictReader(csv_path.open())} == {"ADM-256"}
    assert csv_path.with_suffix(".png").stat().st_size > 0

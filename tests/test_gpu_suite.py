"""The one-command GPU suite: its plan, a CPU run of a quick piece, and that failing or hung pieces do not stop it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu_suite.py"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the suite measures for minutes")


def load_suite():
    spec = importlib.util.spec_from_file_location("run_gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=300)


@cpu_only
def test_dry_run_plans_quick_variants_and_skips_gpu_tests_on_cpu(tmp_path):
    proc = run_suite("--dry-run", "--out-dir", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("pytest", "bench"))}
    assert "skipped: needs CUDA" in lines["pytest-gpu"]
    pieces = ("bench_feature_loss", "bench_attention", "bench_step", "bench_input", "bench_input_center")
    for piece in (*pieces, "bench_epoch_start"):
        assert "would run:" in lines[piece] and f"{piece}_cpu.csv" in lines[piece]
    assert "--crop center" in lines["bench_input_center"] and "--count 24" in lines["bench_input"]
    assert "--quick" in lines["bench_attention"] and "--window-steps" in lines["bench_step"]
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_on_cuda_the_step_piece_measures_the_input_stall_first(tmp_path):
    """A lease too short for the whole step piece still measures compiled vs synthetic: they run first."""
    suite = load_suite()
    ctx = suite.Context(python="python3", out_dir=tmp_path, device="nvidia-h100-80gb-hbm3", cuda=True)
    (step,) = [piece for piece in suite.PIECES if piece.name == "bench_step"]
    command = step.command(ctx)
    assert command[command.index("--modes") + 1] == "compiled,synthetic,eager,naive"
    assert command[command.index("--configs") + 1].startswith("paper-r50,")


@cpu_only
def test_cpu_run_writes_device_named_results_summary_and_archive(tmp_path):
    out, archive = tmp_path / "results", tmp_path / "out" / "gpu_suite.tar.gz"
    proc = run_suite("--pieces", "pytest-gpu,bench_attention", "--out-dir", str(out), "--archive", str(archive))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert {"bench_attention_cpu.csv", "bench_attention_cpu.md", "bench_attention_cpu.png"} <= {
        p.name for p in out.iterdir()
    }
    summary = (out / "gpu_suite_cpu.md").read_text()
    assert "| pytest-gpu | skipped: needs CUDA |" in summary and "| bench_attention | passed |" in summary
    with tarfile.open(archive) as tar:
        assert {"gpu_suite_cpu.md", "bench_attention_cpu.csv"} <= set(tar.getnames())


def test_failing_and_hung_pieces_are_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch, capsys):
    suite = load_suite()
    python = [sys.executable, "-c"]
    monkeypatch.setattr(
        suite,
        "PIECES",
        [
            suite.Piece("broken", lambda c: [*python, "raise SystemExit(3)"], lambda c: []),
            suite.Piece("hung", lambda c: [*python, "import time; time.sleep(60)"], lambda c: [], timeout_s=1),
            suite.Piece("fine", lambda c: [*python, "print('fine ran')"], lambda c: [], log_name="fine_{device}.log"),
        ],
    )
    assert suite.main(["--out-dir", str(tmp_path), "--pieces", "broken,hung,fine", "--wheels", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "fine ran" in printed and "broken" in printed
    device = "cpu" if not torch.cuda.is_available() else suite.device_slug(torch.cuda.get_device_name())
    summary = (tmp_path / f"gpu_suite_{device}.md").read_text()
    assert "| broken | failed (rc 3) |" in summary and "| fine | passed |" in summary
    assert "| hung | timed out after 1 s |" in summary
    assert (tmp_path / f"fine_{device}.log").read_text() == "fine ran\n"


def test_pieces_get_a_deadline_before_their_limit_and_say_when_they_stopped_at_it(tmp_path, monkeypatch, capsys):
    suite = load_suite()
    print_deadline = "import os, time; print('left', float(os.environ['DTENGINE_BENCH_DEADLINE']) - time.time())"
    stopped = "print('time limit (DTENGINE_BENCH_DEADLINE) reached: stopped before case 2')"
    monkeypatch.setattr(
        suite,
        "PIECES",
        [
            suite.Piece(
                "timed", lambda c: [sys.executable, "-c", print_deadline], lambda c: [], timeout_s=300, log_name="t.log"
            ),
            suite.Piece("stopped", lambda c: [sys.executable, "-c", stopped], lambda c: []),
        ],
    )
    wheels = tmp_path / "wheels"  # one this Python cannot install: reported, and the suite goes on without it
    wheels.mkdir()
    (wheels / "simplejpeg-1.9.0-cp99-cp99-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert suite.main(["--out-dir", str(tmp_path), "--pieces", "timed,stopped", "--wheels", str(wheels)]) == 0
    assert f"could not install the wheels in {wheels}" in capsys.readouterr().out
    left = float((tmp_path / "t.log").read_text().split()[1])
    assert 300 - 60 - 5 < left <= 300 - 60 + 1  # its 300 s limit, less the minute to write results
    device = "cpu" if not torch.cuda.is_available() else suite.device_slug(torch.cuda.get_device_name())
    assert "| stopped | passed, cut short by the time limit |" in (tmp_path / f"gpu_suite_{device}.md").read_text()


def test_device_slug_is_a_file_name_part():
    assert load_suite().device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"

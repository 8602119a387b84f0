"""The benchmarks run end to end on tiny inputs and record environment + timings (no speed is asserted)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"


def test_bench_step_measures_the_modes_side_by_side(tiny_run_overrides, tmp_path):
    out = tmp_path / "bench.csv"
    quick = ["--warmup", "1", "--windows", "2", "--window-steps", "1", "--split-steps", "1", "--csv", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--configs", "demo", *quick, *tiny_run_overrides, "compile.backend=aot_eager"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "device=" in proc.stdout and "commit=" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    modes = ["naive", "eager", "compiled", "synthetic"]
    assert [(r["config"], r["mode"]) for r in rows] == [("demo", mode) for mode in modes]
    for column in ("device", "torch", "commit", "date", "img_per_s", "windows", "peak_rss_gb", "warmup_s"):
        assert all(r[column] for r in rows), column
    for column in ("data_wait_ms", "inputs_ms", "teacher_ms", "student_fwd_bwd_ms", "optimizer_ms"):
        assert all(float(r[column]) > 0 for r in rows), column
    assert rows[1]["vs_eager"] == "1.0" and rows[0]["vs_naive"] == "1.0" and rows[0]["mfu"] == "na"  # CPU: no peak
    assert float(rows[1]["gflops_per_image"]) > 0  # counted with the custom ops' formulas
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 0
    summary = [line for line in proc.stdout.splitlines() if line.startswith("config=") and "img_per_s=" in line]
    assert [line.split()[0:2] for line in summary] == [["config=demo", f"mode={m}"] for m in modes]
    assert [field.split("=")[0] for field in summary[0].split()] == [
        "config", "mode", "img_per_s", "vs_eager", "vs_naive", "mfu"
    ]  # fmt: skip
    (stall,) = [line for line in proc.stdout.splitlines() if "input_stall=" in line]
    assert stall.startswith("config=demo input_stall=") and "data_wait_ms=" in stall


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


def bench_step_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_failed_or_overdue_worker_is_one_line_naming_why():
    import argparse

    bench = bench_step_module()
    dynamo = "Traceback (most recent call last):\n  File ...\ntorch._dynamo.exc.Unsupported: torch.* op returned "
    dynamo += "non-Tensor\n  Explanation: ...\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace"
    assert bench.failure_reason(dynamo, 1) == "torch._dynamo.exc.Unsupported: torch.* op returned non-Tensor"
    assert bench.failure_reason("killed\n", -9) == "killed" and bench.failure_reason("", 3) == "exit code 3"
    args = argparse.Namespace(timeout_s=1, warmup=1, windows=1, window_steps=1, split_steps=1, overrides=[])
    args.world_sizes = None
    assert bench.run_worker("demo", "eager", args) == "timed out after 1 s (--timeout-s)"


def test_an_overdue_worker_prints_where_its_time_went(monkeypatch, capsys):
    """A worker killed at its limit leaves partial output (bytes): its progress lines are printed, so a timed-out
    cold compile reads differently from a hang."""
    import argparse
    import subprocess

    bench = bench_step_module()
    progress = bench.Progress("demo compiled", enabled=True)
    progress("set up (data, models, FLOP count)")
    written = capsys.readouterr().err
    assert written.startswith("[demo compiled] ") and written.endswith(" s: set up (data, models, FLOP count)\n")

    def overdue(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=b"", stderr=written.encode())

    monkeypatch.setattr(bench.subprocess, "run", overdue)
    args = argparse.Namespace(timeout_s=7, warmup=1, windows=1, window_steps=1, split_steps=1, overrides=[])
    args.world_sizes = None
    assert bench.run_worker("demo", "compiled", args) == "timed out after 7 s (--timeout-s)"
    printed = capsys.readouterr().out
    assert "config=demo mode=compiled (timed out), the end of its output:" in printed
    assert written.strip() in printed


def test_paper_configurations_build_the_adm_teacher_with_the_paper_taps():
    """Checked on the meta device: no memory, no compute, the architecture only."""
    import torch

    bench = bench_step_module()
    cfg = bench.run_config("paper-r50", [])
    teacher = bench.build_teacher("paper-r50", cfg, torch.device("meta"))
    assert [(lvl.stride, lvl.channels) for lvl in teacher.levels] == [(32, 1024), (16, 1024), (8, 512), (4, 512)]
    assert type(teacher.unet).__name__ == "ADMUNet" and sum(p.numel() for p in teacher.unet.parameters()) == 552_814_086
    assert cfg.teacher.timestep == 150 and cfg.data.image_size == 256 and cfg.data.batch_size == 64
    assert bench.run_config("paper-convnext-b", []).student.model == "convnext_base"
    overridden = bench.run_config("paper-r50", ["data.loader=dali", "data.num_workers=4"]).data
    assert (overridden.loader, overridden.num_workers, overridden.image_size) == ("dali", 4, 256)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and bench.peak_flops("cpu (x86_64)") is None


@pytest.mark.parametrize("kind", ["unet", "adm"])
def test_the_naive_loops_hooks_read_what_the_teacher_reads(kind, tiny_teacher_dir, monkeypatch):
    """The naive baseline taps a full forward with hooks; its features must be the engine teacher's."""
    import torch

    from dtengine import load_config
    from dtengine.teachers import build_teacher

    monkeypatch.syspath_prepend(str(BENCH.parent))
    from naive_loop import decoder_taps

    adm = ["teacher.kind=adm", "teacher.weights=untrained", "teacher.adm.image_size=32", "teacher.blocks=[1,2,3]",
           "teacher.adm.num_channels=32", "teacher.adm.num_res_blocks=1", "teacher.adm.channel_mult='1,1,1,1'",
           "teacher.adm.attention_resolutions='8'"]  # fmt: skip
    unet = [f"teacher.path={tiny_teacher_dir}", "teacher.blocks=[0,1]"]
    teacher = build_teacher(load_config(None, adm if kind == "adm" else unet).teacher)
    hooked, handles = [], []
    for tap, reads_input in decoder_taps(teacher.unet, teacher.cfg.blocks):
        if reads_input:
            handles.append(tap.register_forward_pre_hook(lambda module, args: hooked.append(args[0])))
        else:
            handles.append(tap.register_forward_hook(lambda module, args, output: hooked.append(output)))
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 50])
    with torch.no_grad():
        teacher.unet(x_t, t)
        for handle in handles:
            handle.remove()
        ours = teacher.features(x_t, t)
    assert len(hooked) == len(ours) == len(teacher.cfg.blocks)
    for a, b in zip(hooked, ours):
        torch.testing.assert_close(a, b)


BENCH_INPUT = BENCH.parent / "bench_input.py"


@pytest.mark.parametrize("crop", ["random_resized", "center"])
def test_bench_input_compares_every_loader_with_imagefolder(tmp_path, crop):
    out = tmp_path / "input.csv"
    quick = ["--count", "24", "--batch", "4", "--size", "64", "--workers", "1", "--batches", "2", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, str(BENCH_INPUT), *quick, "--crop", crop, "--rounds", "1", "--csv", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    loaders = [r["loader"] for r in rows]
    assert loaders[:3] == ["imagefolder", "imagefolder-tensor", "wds"] and loaders[-1] == "synthetic"
    assert rows[0]["vs_baseline"] == "1.0" and rows[1]["vs_tensor_recipe"] == "1.0"
    assert all(float(r["img_per_s"]) > 0 and r["crop"] == crop for r in rows)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("loader=")]
    assert [line.split()[0] for line in summary if "vs_baseline=" in line] == [f"loader={name}" for name in loaders]
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_bench_step_scaling_sweep_runs_torchrun_jobs(tiny_run_overrides, tmp_path):
    out = tmp_path / "scaling.csv"
    quick = ["--warmup", "1", "--windows", "1", "--window-steps", "1", "--split-steps", "1", "--csv", str(out)]
    overrides = [o for o in tiny_run_overrides if not o.startswith("data.batch_size")] + ["data.batch_size=2"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--configs", "demo", "--world-sizes", "1,2", *quick, *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["world_size"] for r in rows] == ["1", "2"] and rows[0]["scaling_efficiency"] == "1.0"
    assert float(rows[1]["scaling_efficiency"]) > 0 and "world_size=2" in proc.stdout


BENCH_CROP_RESIZE = BENCH.parent / "bench_crop_resize.py"


@pytest.mark.parametrize("crop", ["random_resized", "center"])
def test_bench_crop_resize_times_both_ways_into_the_batch(tmp_path, crop):
    out = tmp_path / "resize.csv"
    quick = ["--generated", "24", "--count", "8", "--size", "32", "--reps", "1", "--crop", crop, "--csv", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH_CROP_RESIZE), *quick], capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["way"] for r in rows] == ["interpolate", "into-batch"] and rows[0]["vs_interpolate"] == "1.0"
    assert all(float(r["ms_per_image"]) > 0 and r["crop"] == crop and r["images"] == "8" for r in rows)
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("way=")] == [
        "way=interpolate",
        "way=into-batch",
    ]


BENCH_EPOCH_START = BENCH.parent / "bench_epoch_start.py"


def test_bench_epoch_start_times_the_new_epochs_both_ways(tmp_path):
    out = tmp_path / "epoch.csv"
    quick = ["--size", "32", "--images", "48", "--batch", "8", "--workers", "1", "--step-ms", "5", "--epochs", "2"]
    proc = subprocess.run(
        [sys.executable, str(BENCH_EPOCH_START), *quick, "--csv", str(out)], capture_output=True, text=True,
        timeout=300, env={**os.environ, "DTENGINE_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["way"] for r in rows] == ["at-end", "early"]
    assert all(r["epoch_starts"] == "2" and r["batches_per_epoch"] == "6" for r in rows)
    assert all(float(r["epoch_start_wait_ms"]) > 0 and 0 < float(r["stall"]) < 1 for r in rows)
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("way=")] == [
        "way=at-end",
        "way=early",
    ]

"""Runs under the faults of real clusters, as subprocesses of the CLI with faults injected at exact points
(tests/faulty_run.py): SIGKILL at seeded steps and inside a checkpoint write, SIGTERM / SIGINT, a second signal,
a hung save, non-finite values under both policies, a second run into a live run's folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtengine.runtime.checkpoint import list_checkpoints

FAULTY_RUN = Path(__file__).resolve().parent / "faulty_run.py"
REPO = FAULTY_RUN.parent.parent
STEPS, EVERY = 10, 2


def dtengine(args, faults=None, timeout=300, wait=True):
    env = {**os.environ, **(faults or {})}
    command = [sys.executable, str(FAULTY_RUN), *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_args(tiny_run_overrides):
    return ["distill", "--config", "configs/demo.yaml", *tiny_run_overrides,
            f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2"]  # fmt: skip


def out_dir(args) -> Path:
    return Path([a for a in args if a.startswith("out_dir=")][-1].removeprefix("out_dir="))  # the last one wins


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_backbone(a: Path, b: Path) -> None:
    want, got = load_file(a / "backbone.safetensors"), load_file(b / "backbone.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_sigkill_at_seeded_points_and_inside_a_save_then_resume_equals_an_uninterrupted_run(run_args, tmp_path):
    straight = [*run_args, f"out_dir={tmp_path / 'straight'}"]
    assert dtengine(straight).returncode == 0
    args = [*run_args, f"out_dir={tmp_path / 'killed'}"]
    kill_steps = sorted(random.Random(14).sample(range(EVERY, STEPS), 3))
    first = dtengine(args, {"FAULT_KILL_AT_STEP": str(kill_steps[0])})
    assert first.returncode == -signal.SIGKILL
    for step in kill_steps[1:]:
        killed = dtengine([*args, "--resume"], {"FAULT_KILL_AT_STEP": str(step)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    torn = dtengine([*args, "--resume"], {"FAULT_KILL_IN_SAVE": "1"})
    assert torn.returncode == -signal.SIGKILL, torn.stderr
    finished = dtengine([*args, "--resume"])
    assert finished.returncode == 0, finished.stderr
    assert "took over the lock" in finished.stderr  # the killed run's lock, left by a dead pid on this host
    run_dir = out_dir(args)
    assert_same_backbone(tmp_path / "straight", run_dir)
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))  # no row repeated by the resumes
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the torn write is gone


@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_a_signal_finishes_the_step_saves_and_exits_non_zero_with_the_resume_command(run_args, name, code):
    stopped = dtengine(run_args, {"FAULT_SIGNAL_AT_STEP": f"4:{name}"})
    assert stopped.returncode == code, stopped.stderr
    run_dir = out_dir(run_args)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")][-1] == "step_00000005.pt"
    message = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by SIG{name} after step 5 of {STEPS}" in message
    assert f"dtengine distill --resume out_dir={run_dir}" in message
    assert not (run_dir / "backbone.safetensors").exists()
    resumed = dtengine(["distill", "--resume", f"out_dir={run_dir}"])  # the printed command, as printed
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))


def test_a_second_signal_exits_at_once_and_leaves_a_resumable_folder(run_args):
    stopped = dtengine(run_args, {"FAULT_SIGNAL_AT_STEP": "4:TERM:2"})
    assert stopped.returncode == 143
    run_dir = out_dir(run_args)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")][-1] == "step_00000004.pt"
    assert dtengine([*run_args, "--resume"]).returncode == 0


def test_a_save_that_hangs_past_the_grace_period_exits_anyway(run_args):
    start = time.monotonic()
    faults = {"FAULT_SIGNAL_AT_STEP": "3:TERM", "FAULT_SLOW_SAVE_S": "60"}
    stopped = dtengine([*run_args, "train.stop_grace_s=2"], faults)
    assert stopped.returncode == 143
    assert time.monotonic() - start < 50
    assert dtengine([*run_args, "--resume"]).returncode == 0  # from the step-2 checkpoint


def test_nonfinite_teacher_features_stop_the_run_naming_the_step(run_args):
    failed = dtengine(run_args, {"FAULT_NAN_TEACHER_AT": "2"})
    assert failed.returncode == 2
    (line,) = [line for line in failed.stderr.splitlines() if "error" in line]
    assert "step 3: non-finite teacher features" in line and "train.on_nonfinite=skip" in line
    run_dir = out_dir(run_args)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002.pt"]
    assert not (run_dir / "backbone.safetensors").exists()


def test_skip_drops_nonfinite_steps_and_stops_after_too_many_in_a_row(run_args):
    skipped = dtengine([*run_args, "train.on_nonfinite=skip"], {"FAULT_NAN_TEACHER_AT": "2,5"})
    assert skipped.returncode == 0, skipped.stderr
    run_dir = out_dir(run_args)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "backbone.safetensors").values())

    endless = [*run_args, "train.on_nonfinite=skip", "train.max_nonfinite_in_a_row=3", f"out_dir={run_dir}-endless"]
    failed = dtengine(endless, {"FAULT_NAN_TEACHER_AT": "all"})
    assert failed.returncode == 2
    assert "3 steps in a row had non-finite teacher features" in failed.stderr


def test_a_diverging_run_stops_saves_nothing_nonfinite_and_writes_strict_json(run_args):
    diverging = [*run_args, "optim.lr=1e6", "optim.warmup_steps=0", "train.on_nonfinite=skip",
                 "train.max_nonfinite_in_a_row=2"]  # fmt: skip
    failed = dtengine(diverging)
    assert failed.returncode == 2, failed.stderr
    assert "steps in a row had non-finite" in failed.stderr
    run_dir = out_dir(run_args)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-strict JSON token {token}"))
    for path in list_checkpoints(run_dir / "checkpoints"):
        from dtengine.runtime.checkpoint import load_checkpoint

        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["student"].values() if t.is_floating_point())
    assert not (run_dir / "backbone.safetensors").exists()


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_the_holder(run_args):
    args = [*run_args, "train.steps=400", "checkpoint.every=400"]
    first = dtengine(args, wait=False)
    try:
        run_dir = out_dir(run_args)
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():  # the first run holds the lock and trains
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.5)
        for second in (dtengine(args), dtengine(["distill", "--resume", f"out_dir={run_dir}"])):
            assert second.returncode == 2
            (line,) = [line for line in second.stderr.splitlines() if line.strip()]
            assert f"in use by another dtengine run (pid {first.pid} on" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143

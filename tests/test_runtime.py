"""runtime/: checkpoints (weights_only, RNG states as tensors, format errors, checksums), atomic io, the folder
lock, strict metrics, step windows, RNG helpers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from dtengine.runtime import checkpoint as ckpt
from dtengine.runtime.config import config_from_dict
from dtengine.runtime.device import SampleKeys, keyed_normal, resolve_device, resolve_precision, seeded
from dtengine.runtime.errors import CheckpointError, ConfigError, OutputDirError
from dtengine.runtime.io import FolderLock, atomic_folder, atomic_write, prepare_output_dir
from dtengine.runtime.logging import MetricsLogger, StepWindow
from dtengine.teachers import TeacherConfig


def draws():
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2).tolist()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()
    path = ckpt.save_checkpoint(tmp_path, 7, {"rng": ckpt.capture_rng_state(), "step": 7}, keep=2)
    want = draws()
    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert state["step"] == 7
    ckpt.restore_rng_state(state["rng"])
    assert draws() == want


def test_old_and_foreign_checkpoints_get_one_line_errors(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, old)  # pickled numpy: the format before 2
    with pytest.raises(CheckpointError, match="older dtengine") as caught:
        ckpt.load_checkpoint(old)
    assert "\n" not in str(caught.value)
    unversioned = tmp_path / "unversioned.pt"
    torch.save({"step": 1}, unversioned)
    with pytest.raises(CheckpointError, match="has format none"):
        ckpt.load_checkpoint(unversioned)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(tmp_path / "truncated.pt")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty-run")


def test_keep_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = atomic_write(tmp_path / "a.json", "old")

    def half_written(handle):
        handle.write(b"new and incomplete")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_written)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "data") as tmp:
        (tmp / "part").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "data") as tmp:
        (tmp / "part").write_text("x")
    assert (tmp_path / "data" / "part").read_text() == "x" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / "data"):
        pass


def test_prepare_output_dir(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "run").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match="not writable.*choose another"):
        prepare_output_dir(tmp_path / "file" / "run")


def test_step_window_sums_on_device_and_pulls_once():
    window = StepWindow()
    for value in (1.0, 2.0, 4.0):
        window.add_tensors({"loss": torch.tensor(value)}, scale=0.5)
        window.add(steps=1, images=8)
    sums = window.pull()
    assert sums["loss"] == 3.5 and sums["steps"] == 3 and sums["images"] == 24 and sums["seconds"] >= 0
    assert set(window.pull()) == {"seconds"}  # a new window starts empty


def test_seeded_and_keyed_randomness():
    with seeded(5):
        a = torch.rand(3)
    outside = torch.get_rng_state()
    with seeded(5):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(outside, torch.get_rng_state())
    noise = keyed_normal(SampleKeys(1, 2, 10).generators(3), (2, 4), torch.device("cpu"))
    again = keyed_normal(SampleKeys(1, 2, 11).generators(2), (2, 4), torch.device("cpu"))
    assert noise.shape == (3, 2, 4) and torch.equal(noise[1:], again)


def test_device_and_precision_resolution():
    assert resolve_precision("auto", "cpu") == torch.float32 and resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="train.device 'tpu'"):
        resolve_device("tpu", "train.device")


def test_cuda_precision_query_traces_into_one_graph():
    # The student pass asks for its precision inside a fullgraph compile; on CUDA that asks the hardware for bf16
    # support, which dynamo cannot trace as a plain torch query (it broke every compiled CUDA step once).
    def to_compute_dtype(x):
        return x.to(resolve_precision("auto", "cuda"))

    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert torch.compile(to_compute_dtype, fullgraph=True, backend="eager")(torch.ones(2)).dtype == expected


def test_config_from_dict_names_the_bad_key():
    assert config_from_dict({"timestep": 7}, schema=TeacherConfig).timestep == 7
    with pytest.raises(ConfigError, match="the run's teacher config is invalid: unknown config key 'timestpe'"):
        config_from_dict({"timestpe": 7}, schema=TeacherConfig, what="the run's teacher config")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((64,), float(step))}, keep=3)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the payload
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|unreadable"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint 'step_00000002.pt'"):
        state, path = ckpt.load_newest_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn by a crash
    with pytest.warns(UserWarning):
        assert ckpt.load_newest_checkpoint(tmp_path)[0]["step"] == 1


def test_a_crafted_pickle_runs_no_code(tmp_path):
    """A checkpoint whose pickle would run a command: refused with a one-line error, the command never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "step_00000001.pt"
    crafted.write_bytes(pickle.dumps({"format_version": ckpt.FORMAT_VERSION, "x": Exploit()}))
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_checkpoint(crafted)
    assert "\n" not in str(caught.value) and not marker.exists()
    torch.save({"student": Exploit()}, crafted)  # the same inside torch's zip format
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(crafted)
    assert not marker.exists()


def test_metrics_are_strict_json_and_repaired_on_resume(tmp_path):
    metrics = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        metrics.log(step, {"loss": float("nan") if step == 2 else 0.5, "grad_norm": torch.tensor(float("inf"))})
    metrics.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 0.')  # killed mid-line
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:3]]
    assert rows[1] == {"step": 2, "loss": None, "grad_norm": None}

    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()  # resumed from step 2's checkpoint
    kept = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2]

    MetricsLogger(tmp_path, tensorboard=False).close()  # a fresh run: the old rows are moved aside, not appended to
    assert not (tmp_path / "metrics.jsonl").exists()
    (moved,) = tmp_path.glob("metrics.before-*.jsonl")
    assert len(moved.read_text().splitlines()) == 2


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    holder = subprocess.run(
        [sys.executable, "-c", f"from dtengine.runtime.io import FolderLock; FolderLock({str(tmp_path)!r}).acquire()"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert f"is in use by another dtengine run (pid {os.getpid()} on" in holder.stderr
    lock.release()

    # A run killed while holding the lock leaves its note behind; the kernel has released the flock itself.
    subprocess.run(
        [sys.executable, "-c", f"import os; from dtengine.runtime.io import FolderLock; "
         f"FolderLock({str(tmp_path)!r}).acquire(); os._exit(9)"],
        check=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"took over the lock .* left by a run that is gone \(pid \d+ on"):
        FolderLock(tmp_path).acquire().release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released cleanly: no warning the next time
        FolderLock(tmp_path).acquire().release()

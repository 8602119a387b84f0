"""runtime/: checkpoints (weights_only, RNG states as tensors, format errors), atomic io, step windows, RNG helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dtengine.runtime import checkpoint as ckpt
from dtengine.runtime.config import config_from_dict
from dtengine.runtime.device import SampleKeys, keyed_normal, resolve_device, resolve_precision, seeded
from dtengine.runtime.errors import CheckpointError, ConfigError, OutputDirError
from dtengine.runtime.io import atomic_folder, atomic_write, prepare_output_dir
from dtengine.runtime.logging import StepWindow
from dtengine.teachers import TeacherConfig


def draws():
    return random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2).tolist()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()
    path = ckpt.save_checkpoint(tmp_path, 7, {"rng": ckpt.capture_rng_state(), "step": 7}, keep=2)
    want = draws()
    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["step"] == 7
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


def test_config_from_dict_names_the_bad_key():
    assert config_from_dict({"timestep": 7}, schema=TeacherConfig).timestep == 7
    with pytest.raises(ConfigError, match="the run's teacher config is invalid: unknown config key 'timestpe'"):
        config_from_dict({"timestpe": 7}, schema=TeacherConfig, what="the run's teacher config")

"""End-to-end distillation on CPU: outputs, exact resume, export, and the run-level bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

from dtengine import load_config
from dtengine.runtime.checkpoint import list_checkpoints, load_checkpoint
from dtengine.runtime.errors import CheckpointError, ConfigError, DataError, OutputDirError, StudentError
from dtengine.train.distillation import run_distillation


def config(overrides, *extra):
    return load_config(None, [*overrides, *extra])


def test_three_step_run_writes_everything(tiny_run_overrides):
    result = run_distillation(config(tiny_run_overrides))
    run = result.run_dir
    assert result.steps == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "mse", "at", "lr", "img_per_s", "data_wait_s", "grad_norm", "skipped_corrupt"):
        assert key in rows[0], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (run / "config.yaml").is_file()
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002.pt", "step_00000003.pt"]
    state = load_checkpoint(run)
    assert state["step"] == 3 and {"student", "optimizer", "scheduler", "rng"} <= set(state)
    loaded = timm.create_model(
        "resnet18", features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(result.backbone_path))
    )
    for key, value in state["student"].items():
        if key.startswith("backbone."):
            torch.testing.assert_close(loaded.state_dict()[key.removeprefix("backbone.")], value, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["wds", "dali", "synthetic"])
def test_resume_continues_exactly(tiny_run_overrides, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    tiny_run_overrides = [*tiny_run_overrides, f"data.loader={loader}"]
    straight = run_distillation(config(tiny_run_overrides, "train.steps=4", "checkpoint.keep=5"))
    # A run interrupted after step 2 leaves exactly the checkpoint the uninterrupted run wrote at step 2.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(straight.run_dir / "checkpoints" / "step_00000002.pt", resumed_dir / "checkpoints")
    resumed = run_distillation(config(tiny_run_overrides, "train.steps=4", f"out_dir={resumed_dir}"), resume=True)
    assert resumed.steps == 4
    want = load_checkpoint(straight.run_dir)["student"]
    got = load_checkpoint(resumed.run_dir)["student"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    rows = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows[2:]]


def test_resume_with_a_different_architecture_is_refused(tiny_run_overrides):
    first = run_distillation(config(tiny_run_overrides, "train.steps=2"))
    with pytest.raises(CheckpointError, match="written for"):
        run_distillation(config(tiny_run_overrides, "student.model=resnet34", "train.steps=4"), resume=True)
    with pytest.raises(CheckpointError, match="written for"):
        run_distillation(config(tiny_run_overrides, "student.regressor_channels=16"), resume=str(first.run_dir))


def test_fresh_run_refuses_to_overwrite_an_existing_run(tiny_run_overrides):
    run_distillation(config(tiny_run_overrides, "train.steps=1", "checkpoint.every=1"))
    with pytest.raises(OutputDirError, match="already holds a run"):
        run_distillation(config(tiny_run_overrides))


def test_unwritable_output_dir(tiny_run_overrides, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match="not writable"):
        run_distillation(config(tiny_run_overrides, f"out_dir={blocker / 'run'}"))


def test_bad_model_and_shards(tiny_run_overrides, tmp_path):
    with pytest.raises(StudentError, match="not a timm model"):
        run_distillation(config(tiny_run_overrides, "student.model=resnet_eighteen"))
    with pytest.raises(DataError, match="matched no files"):
        run_distillation(config(tiny_run_overrides, f"data.shards={tmp_path}/none-{{000..003}}.tar"))


def test_resume_without_checkpoint_is_a_clear_error(tiny_run_overrides):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_distillation(config(tiny_run_overrides), resume=True)


@pytest.mark.gpu
def test_cuda_run_uses_bf16_and_channels_last(tiny_run_overrides):
    from dtengine.teachers import build_diffusion_teacher

    cfg = config(tiny_run_overrides, "train.device=cuda", "train.steps=2")
    teacher = build_diffusion_teacher(cfg.teacher, "cuda")
    assert teacher.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    result = run_distillation(cfg)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))


def test_held_out_loss_profile_trace_and_peak_memory(tiny_run_overrides, tiny_val_shards):
    overrides = ["train.steps=3", "train.val_every=2", "train.val_batches=2", "train.profile_steps=2:3"]
    result = run_distillation(config(tiny_run_overrides, *overrides, f"data.val_shards={tiny_val_shards}"))
    rows = {r["step"]: r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())}
    assert "val_loss" not in rows[1] and {"val_loss", "val_mse", "val_at"} <= set(rows[2]) and "val_loss" in rows[3]
    assert rows[1]["first_step_s"] > 0 and rows[1]["compiled"] == "none"  # compile is off on CPU by default
    assert all(r["peak_rss_gb"] > 0 for r in rows.values())
    assert (result.run_dir / "profile" / "trace_steps_2-3.json").stat().st_size > 1000
    # The same held-out batches and noise every time: an unchanged student scores the same twice.
    from dtengine.train import distillation

    again = config(tiny_run_overrides, f"out_dir={result.run_dir}-again", f"data.val_shards={tiny_val_shards}")
    run = distillation.build_run(again, distillation.init_world("cpu", again.distributed), resuming=False)
    batches = distillation.held_out_batches(run.cfg)
    assert distillation.validate(run, batches) == distillation.validate(run, batches)


def test_held_out_shards_are_required_for_own_data(tiny_run_overrides, tiny_shards):
    with pytest.raises(ConfigError, match="data.val_shards"):
        run_distillation(config(tiny_run_overrides, f"data.shards={tiny_shards}", "train.val_every=1"))
    with pytest.raises(ConfigError, match="profile_steps"):
        config(tiny_run_overrides, "train.profile_steps=5")

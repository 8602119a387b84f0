"""`dtengine train-teacher` trains a DDPM and writes a folder that loads as a teacher."""

from __future__ import annotations

import json

import pytest

from dtengine.cli import main
from dtengine.teachers import TeacherConfig, build_diffusion_teacher


def test_train_teacher_writes_a_loadable_teacher(capsys, tiny_shards, tmp_path):
    out = tmp_path / "teacher"
    argv = [
        "train-teacher",
        "--out",
        str(out),
        f"data.shards={tiny_shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "model.block_out_channels=[16,16,32,32]",
        "model.norm_num_groups=8",
        "model.attention_head_dim=8",
        "steps=3",
        "log_every=1",
        "num_samples=2",
        "progress=false",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert "teacher saved to" in capsys.readouterr().out
    for name in ("unet/config.json", "scheduler/scheduler_config.json", "model_index.json", "samples.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    teacher = build_diffusion_teacher(TeacherConfig(path=str(out), blocks=[0, 1]))
    assert [lvl.stride for lvl in teacher.levels] == [8, 4]
    # the folder is not overwritten by a second run
    assert main(argv) == 2
    assert "already holds a teacher" in capsys.readouterr().err


def test_train_teacher_rejects_bad_keys(capsys):
    assert main(["train-teacher", "stesp=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["model.norm_num_groups=7", "ema_decay=1.5"])
def test_train_teacher_validates_values(capsys, bad):
    assert main(["train-teacher", bad]) == 2


def test_interrupted_training_still_leaves_a_teacher(capsys, tiny_shards, tmp_path, monkeypatch):
    from dtengine.data import ShardStream

    real_epoch = ShardStream.epoch

    def epoch_then_ctrl_c(self, epoch, skip_batches=0):
        batches = real_epoch(self, epoch, skip_batches)
        yield next(batches)
        yield next(batches)
        raise KeyboardInterrupt  # what Ctrl-C raises in the main process

    monkeypatch.setattr(ShardStream, "epoch", epoch_then_ctrl_c)
    out = tmp_path / "teacher"
    argv = ["train-teacher", "--out", str(out), f"data.shards={tiny_shards}", "data.image_size=32"]
    argv += ["data.batch_size=4", "data.num_workers=0", "model.block_out_channels=[16,16,32,32]"]
    argv += ["model.norm_num_groups=8", "model.attention_head_dim=8", "steps=50", "progress=false"]
    assert main(argv) == 130
    assert "interrupted at step 3; saved the EMA teacher of step 2" in capsys.readouterr().err
    assert build_diffusion_teacher(TeacherConfig(path=str(out), blocks=[0])).levels[0].stride == 8


def test_init_from_continues_an_existing_teacher(capsys, tiny_shards, tiny_teacher_dir, tmp_path):
    import torch

    common = [f"data.shards={tiny_shards}", "data.batch_size=4", "data.num_workers=0", "progress=false"]
    common += [f"init_from={tiny_teacher_dir}", "num_samples=0", "lr=1e-9", "warmup_steps=1"]
    out = tmp_path / "continued"
    assert main(["train-teacher", "--out", str(out), "data.image_size=32", "steps=1", *common]) == 0
    start = build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), blocks=[0]))
    continued = build_diffusion_teacher(TeacherConfig(path=str(out), blocks=[0]))
    assert continued.unet.config.block_out_channels == start.unet.config.block_out_channels
    for a, b in zip(start.unet.parameters(), continued.unet.parameters()):  # one step at lr 1e-9 barely moves
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main(["train-teacher", "--out", str(tmp_path / "wrong"), "data.image_size=64", "steps=1", *common]) == 2
    assert "trained at 32 px but data.image_size is 64" in capsys.readouterr().err

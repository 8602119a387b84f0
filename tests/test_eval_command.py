"""`dtengine eval` end to end on a 3-step tiny run, and its bad inputs as one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from dtengine import load_config
from dtengine.cli import main
from dtengine.data import write_shards
from dtengine.eval.command import add_eval_command
from dtengine.runtime.errors import CheckpointError, DataError, DTEngineError
from dtengine.train.distillation import run_distillation


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tiny_teacher_dir, tmp_path_factory) -> Path:
    """One 2-step distill run shared by this module's tests (none of them modifies it)."""
    overrides = [
        f"out_dir={tmp_path_factory.mktemp('eval') / 'run'}",
        f"data.shards={tiny_shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        f"teacher.path={tiny_teacher_dir}",
        "teacher.blocks=[0,1]",
        "student.regressor_channels=32",
        "optim.warmup_steps=1",
        "train.steps=2",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    return run_distillation(load_config(None, overrides)).run_dir


@pytest.fixture
def tiny_eval_overrides(tiny_shards) -> list[str]:
    root = Path(tiny_shards).parent
    return [
        f"data.train_shards={root / 'train-*.tar'}",
        f"data.val_shards={root / 'val-*.tar'}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.max_train_images=24",
        "probe.epochs=2",
        "probe.batch_size=8",
        "probe.global_steps=5",
        "finetune.images=4",
        "finetune.steps=2",
        "finetune.batch_size=2",
        "supervised.steps=2",
        "supervised.batch_size=4",
        "progress=false",
    ]


def dispatch(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="dtengine")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.func(args)


def test_eval_writes_json_and_chart(tiny_run, tiny_eval_overrides, capsys):
    baselines = ["--baseline", "random", "--baseline", "teacher", "--baseline", "supervised"]
    dispatch("--checkpoint", str(tiny_run), *baselines, "--seeds", "2", *tiny_eval_overrides)
    out = capsys.readouterr().out
    assert "dense probe mIoU" in out and "supervised" in out
    report = json.loads((tiny_run / "eval" / "eval.json").read_text())
    assert list(report["models"]) == ["student", "random", "teacher", "supervised"]
    assert report["seeds"] == [0, 1]
    for name, model in report["models"].items():
        expected = {"dense_miou", "dense_pixel_acc", "global_top1"} | (
            {"finetune_miou"} if name != "teacher" else set()
        )
        assert set(model["metrics"]) == expected, name
        for value in model["metrics"].values():
            assert len(value["per_seed"]) == 2 and 0 <= value["mean"] <= 1 and value["std"] >= 0
    assert report["protocol"]["finetune"]["images"] == 4 and "torch" in report["versions"]
    assert (tiny_run / "eval" / "eval.png").stat().st_size > 1000


def test_compare_runs_and_margins_over_random(tiny_run, tiny_eval_overrides, tmp_path, capsys):
    fast = [*tiny_eval_overrides, "probe.epochs=1", "finetune.steps=1"]
    step_file = sorted((tiny_run / "checkpoints").glob("step_*.pt"))[0]
    out = tmp_path / "cmp"
    dispatch(
        "--checkpoint", str(tiny_run), "--compare", f"early={step_file}", "--baseline", "random", "--seeds", "2",
        "--out", str(out), *fast,
    )  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["student", "early", "random"]
    assert report["compared"] == {"early": str(step_file)}
    # The random baseline is rebuilt per seed: its two repeats start from different weights.
    random_runs = report["models"]["random"]["metrics"]["finetune_miou"]["per_seed"]
    student_runs = report["models"]["student"]["metrics"]["finetune_miou"]["per_seed"]
    assert len(random_runs) == 2 and len(student_runs) == 2
    margins = report["versus_random"]
    assert set(margins) == {"student", "early"}
    row = margins["student"]["dense_miou"]
    metrics = report["models"]
    expected = metrics["student"]["metrics"]["dense_miou"]["mean"] - metrics["random"]["metrics"]["dense_miou"]["mean"]
    assert row["margin"] == pytest.approx(expected)
    assert "margin over random" in printed and "early:" in printed
    markdown = (out / "eval.md").read_text()
    assert markdown.startswith("| model | dense probe mIoU |") and "| early |" in markdown and "early:" in markdown


def test_compare_labels_must_be_new(tiny_run, tiny_eval_overrides):
    from dtengine.runtime.errors import ConfigError

    for bad in ("random=x", "student=x", "nolabel"):
        with pytest.raises(ConfigError) as err:
            dispatch("--checkpoint", str(tiny_run), "--compare", bad, *tiny_eval_overrides)
        assert "LABEL=RUN" in one_line(err.value)


def test_eval_accepts_a_checkpoint_file_and_an_exported_backbone(tiny_run, tiny_eval_overrides, tmp_path):
    fast = [*tiny_eval_overrides, "probe.epochs=1", "finetune.steps=1"]
    step_file = sorted((tiny_run / "checkpoints").glob("step_*.pt"))[-1]
    dispatch("--checkpoint", str(step_file), "--out", str(tmp_path / "a"), *fast)
    dispatch("--checkpoint", str(tiny_run / "backbone.safetensors"), "--out", str(tmp_path / "b"), *fast)
    a = json.loads((tmp_path / "a" / "eval.json").read_text())["models"]["student"]["metrics"]
    b = json.loads((tmp_path / "b" / "eval.json").read_text())["models"]["student"]["metrics"]
    assert a == b  # the exported backbone is the final checkpoint's, and the protocol is seeded


def one_line(err: DTEngineError) -> str:
    assert "\n" not in str(err)
    return str(err)


def test_bad_checkpoints_are_one_line_errors(tiny_eval_overrides, tmp_path):
    with pytest.raises(CheckpointError) as missing:
        dispatch("--checkpoint", str(tmp_path / "nope"), *tiny_eval_overrides)
    assert "does not exist" in one_line(missing.value)
    no_config = tmp_path / "run-without-config"
    (no_config / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        dispatch("--checkpoint", str(no_config), *tiny_eval_overrides)
    assert "has no config.yaml" in one_line(err.value)
    (tmp_path / "backbone.safetensors").write_bytes(b"not really")
    with pytest.raises(CheckpointError) as err:
        dispatch("--checkpoint", str(tmp_path / "backbone.safetensors"), *tiny_eval_overrides)
    assert "backbone.json" in one_line(err.value)


def test_shards_without_labels_are_refused(tiny_run, tiny_eval_overrides, tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    write_shards([{"__key__": f"img{i}", "jpg": buffer.getvalue()} for i in range(4)], tmp_path, "plain", 4)
    with pytest.raises(DataError) as err:
        dispatch("--checkpoint", str(tiny_run), *tiny_eval_overrides, f"data.train_shards={tmp_path}/plain-*.tar")
    assert "has no 'seg.png' label" in one_line(err.value)


def test_a_crafted_pickle_given_to_eval_and_to_resume_runs_no_code(tiny_run, tiny_eval_overrides, tmp_path, capsys):
    """The file's pickle would run a shell command; both commands refuse it in one line and the command never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    crafted = run / "checkpoints" / "step_00000002.pt"
    crafted.write_bytes(pickle.dumps({"format_version": 4, "student": Exploit()}))
    with pytest.raises(CheckpointError) as err:
        dispatch("--checkpoint", str(crafted), *tiny_eval_overrides)
    assert "a safe (weights_only) load refuses" in one_line(err.value)
    assert main(["distill", "--resume-from", str(crafted), f"out_dir={tmp_path / 'resumed'}"]) == 2
    assert "a safe (weights_only) load refuses" in one_line(capsys.readouterr().err.strip())
    assert not marker.exists()

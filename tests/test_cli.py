"""The CLI: every bad input is one line on stderr, exit code 2, no traceback; good runs print where to look."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dtengine.cli import main
from dtengine.data import write_shards


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def shards_with_corrupt_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        data = buffer.getvalue()
        if i == 5:
            data = data[:40] + b"garbage" * 8  # a JPEG header followed by nonsense
        samples.append({"__key__": f"img{i:03d}", "jpg": data})
    write_shards(samples, tmp_path / "corrupt", "bad", samples_per_shard=12)
    return str(tmp_path / "corrupt" / "bad-000000.tar")


def test_distill_prints_run_dir_and_losses(capsys, tiny_run_overrides):
    code, out, err = run_cli(capsys, "distill", *tiny_run_overrides)
    assert code == 0, err
    assert "run directory:" in out and "(final)" in out and "backbone:" in out


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("data.shards=/nonexistent/shard-{000..009}.tar", ["matched no files", "make-shards"]),
        ("teacher.path=/nonexistent/teacher", ["teacher directory", "does not exist"]),
        ("student.model=resnet_18", ["not a timm model", "resnet18"]),
        ("teacher.blocks=[0,9]", ["teacher.blocks [9] out of range"]),
        ("train.stpes=3", ["unknown config key 'train.stpes'", "train.steps"]),
        ("train.steps=many", ["config key 'train.steps' has the wrong type"]),
        ("out_dir=/proc/version/run", ["not writable"]),
    ],
)
def test_bad_input_is_one_line(capsys, tiny_run_overrides, override, fragments):
    code, _, err = run_cli(capsys, "distill", *tiny_run_overrides, override)
    assert_one_line_error(code, err, *fragments)


def test_teacher_dir_that_is_not_diffusers(capsys, tiny_run_overrides, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    code, _, err = run_cli(capsys, "distill", *tiny_run_overrides, f"teacher.path={tmp_path / 'not-a-model'}")
    assert_one_line_error(code, err, "not a diffusers model")


def test_resume_different_architecture(capsys, tiny_run_overrides):
    assert run_cli(capsys, "distill", *tiny_run_overrides, "train.steps=2")[0] == 0
    code, _, err = run_cli(capsys, "distill", "--resume", *tiny_run_overrides, "student.model=resnet34")
    assert_one_line_error(code, err, "student.model: 'resnet18' -> 'resnet34'", "--allow-change student.model")
    allowed = ("--allow-change", "student.model", "--allow-change", "train.steps")
    code, _, err = run_cli(capsys, "distill", "--resume", *allowed, *tiny_run_overrides, "student.model=resnet34")
    assert_one_line_error(code, err, "checkpoint was written for")  # allowed, but the weights cannot fit


def test_corrupt_jpeg_fails_or_is_skipped_and_counted(capsys, tiny_run_overrides, shards_with_corrupt_jpeg, tmp_path):
    base = [*tiny_run_overrides, f"data.shards={shards_with_corrupt_jpeg}", "data.shuffle_buffer=0"]
    code, _, err = run_cli(capsys, "distill", *base, "data.on_corrupt=fail", f"out_dir={tmp_path / 'fail'}")
    assert_one_line_error(code, err, "corrupt image", "bad-000000.tar", "data.on_corrupt=skip")
    code, _, err = run_cli(capsys, "distill", *base, "train.steps=2", f"out_dir={tmp_path / 'skip'}")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_corrupt"] for r in rows) == 1


def test_debug_shows_the_traceback(tiny_run_overrides):
    with pytest.raises(Exception, match="not a timm model"):
        main(["--debug", "distill", *tiny_run_overrides, "student.model=resnet_18"])


def test_module_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dtengine", "distill", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dtengine distill: error: config file '{tmp_path / 'missing.yaml'}' does not exist; "
        "pass an existing YAML file to --config"
    ]


def test_make_shards_command(capsys, tmp_path):
    src = tmp_path / "images" / "nested"
    src.mkdir(parents=True)
    Image.new("RGB", (20, 16), (200, 10, 10)).save(src / "a.png")
    Image.new("RGB", (20, 16), (10, 200, 10)).save(src / "b.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    code, out, err = run_cli(
        capsys, "make-shards", "--from-folder", str(tmp_path / "images"), "--out", str(tmp_path / "s")
    )
    assert code == 0, err
    assert "wrote 2 images" in out and "broken.jpg" in out
    assert sorted(p.suffix for p in (tmp_path / "s").iterdir() if p.suffix in {".tar", ".idx"}) == [".idx", ".tar"]
    code, _, err = run_cli(
        capsys, "make-shards", "--from-folder", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")
    )
    assert_one_line_error(code, err)


def test_check_shards_reports_and_fixes(capsys, shards_with_corrupt_jpeg):
    code, out, _ = run_cli(capsys, "check-shards", shards_with_corrupt_jpeg)
    assert code == 1 and "sample 'img005': image:" in out and "1 shards, 12 samples: 1 broken" in out
    code, out, _ = run_cli(capsys, "check-shards", shards_with_corrupt_jpeg, "--fix")
    assert code == 0 and "(removed)" in out and "rewrote 1 shards" in out
    code, out, _ = run_cli(capsys, "check-shards", shards_with_corrupt_jpeg)
    assert code == 0 and "1 shards, 11 samples: 0 broken, 0 unreadable shards" in out


def test_check_shards_reports_an_empty_tar_and_a_text_file_named_tar(capsys, tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "s-000000.tar", "w"):
        pass
    (tmp_path / "s-000001.tar").write_text("just some notes\n" * 40)
    code, out, _ = run_cli(capsys, "check-shards", str(tmp_path / "s-{000000..000001}.tar"))
    assert code == 1
    assert "s-000000.tar: unreadable (holds no samples" in out
    assert "s-000001.tar: unreadable (" in out and "is not a tar archive" in out
    assert "2 shards, 0 samples: 0 broken, 2 unreadable shards" in out


def test_resume_from_an_exported_backbone_says_what_it_is(capsys, tiny_run_overrides, tmp_path):
    assert run_cli(capsys, "distill", *tiny_run_overrides, "train.steps=2")[0] == 0
    backbone = tmp_path / "run" / "backbone.safetensors"
    code, _, err = run_cli(capsys, "distill", "--resume-from", str(backbone), f"out_dir={tmp_path / 'next'}")
    assert_one_line_error(code, err, "is an exported backbone, not a training checkpoint")

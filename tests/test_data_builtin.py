"""The built-in dataset: reproducible bytes, caching, atomic generation."""

import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from dtengine.data import SHAPE_CLASSES, builtin
from dtengine.data import builtin_dataset as make_builtin
from dtengine.runtime.errors import DataError

SMALL = {"image_size": 32, "num_train": 40, "num_val": 8, "samples_per_shard": 16}


def _shard_bytes(pattern: str) -> list[bytes]:
    return [Path(p).read_bytes() for p in braceexpand(pattern)]


def test_layout_and_contents(tmp_path):
    ds = make_builtin(tmp_path, **SMALL)
    assert ds.root == tmp_path / "builtin-shapes-v1-32px-40-8-seed0"
    assert ds.classes == SHAPE_CLASSES
    train, val = list(braceexpand(ds.train_pattern)), list(braceexpand(ds.val_pattern))
    assert [Path(p).name for p in train] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [Path(p).name for p in val] == ["val-000000.tar"]
    assert all(Path(p).with_suffix(".idx").is_file() for p in train + val)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    with tarfile.open(train[0]) as archive:
        names = archive.getnames()
        assert names[:3] == ["train0000000.cls", "train0000000.jpg", "train0000000.seg.png"]
        image = Image.open(io.BytesIO(archive.extractfile(names[1]).read()))
        seg = np.asarray(Image.open(io.BytesIO(archive.extractfile(names[2]).read())))
        cls = int(archive.extractfile(names[0]).read())
    assert image.size == (32, 32) and image.format == "JPEG"
    assert seg.shape == (32, 32) and seg.max() < len(SHAPE_CLASSES) and (seg == cls).any()


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_builtin(tmp_path / "a", **SMALL)
    b = make_builtin(tmp_path / "b", **SMALL)
    c = make_builtin(tmp_path / "c", **SMALL, seed=1)
    assert _shard_bytes(a.train_pattern) == _shard_bytes(b.train_pattern)
    assert _shard_bytes(a.val_pattern) == _shard_bytes(b.val_pattern)
    assert _shard_bytes(a.train_pattern) != _shard_bytes(c.train_pattern)


def test_train_and_val_differ(tmp_path):
    ds = make_builtin(tmp_path, **{**SMALL, "num_val": 16})
    with tarfile.open(next(braceexpand(ds.train_pattern))) as t, tarfile.open(next(braceexpand(ds.val_pattern))) as v:
        assert t.extractfile("train0000000.jpg").read() != v.extractfile("val0000000.jpg").read()


def test_second_call_reuses_cache(tmp_path, monkeypatch):
    first = make_builtin(tmp_path, **SMALL)
    stamps = [Path(p).stat().st_mtime_ns for p in braceexpand(first.train_pattern)]

    def fail(*args, **kwargs):
        raise AssertionError("dataset regenerated")

    monkeypatch.setattr(builtin, "_generate", fail)
    second = make_builtin(tmp_path, **SMALL)
    assert second == first
    assert stamps == [Path(p).stat().st_mtime_ns for p in braceexpand(second.train_pattern)]


def test_default_root_comes_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DTENGINE_CACHE", str(tmp_path / "cache"))
    ds = make_builtin(**SMALL)
    assert ds.root.parent == tmp_path / "cache"


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "render_sample", broken)
    with pytest.raises(KeyboardInterrupt):
        make_builtin(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert make_builtin(tmp_path, **SMALL).root.is_dir()


def test_bad_parameters_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="num_train"):
        make_builtin(tmp_path, num_train=0)


def test_files_and_folder_honour_the_umask(tmp_path):
    # tempfile.mkstemp/mkdtemp would leave 0600/0700 modes that hide a shared cache from other users.
    umask = os.umask(0o022)
    try:
        ds = make_builtin(tmp_path, **SMALL)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(ds.root.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in ds.root.iterdir()} == {0o644}

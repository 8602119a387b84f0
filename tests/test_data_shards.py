"""Shard writing, the DALI index format, and packing a folder of images into shards."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dtengine.data import make_shards_from_folder, write_shards, write_wds_index
from dtengine.runtime.errors import DataError


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _samples(n: int) -> list[dict]:
    return [
        {"__key__": f"s{i:04d}", "jpg": _jpeg(i), "seg.png": b"\x89PNG fake", "cls": str(i % 5).encode()}
        for i in range(n)
    ]


def _read_back(tar_paths: list[Path]) -> list[dict]:
    return list(wds.tarfile_to_samples()(iter([{"url": str(p)} for p in tar_paths])))


def _dali_index(tar: Path, idx: Path) -> str:
    """Run DALI's bundled wds2idx tool on `tar`, as a user would."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali (which bundles the wds2idx tool) is not installed")
    import wds2idx as dali_tool  # a top-level module shipped in the nvidia-dali wheel

    subprocess.run([sys.executable, dali_tool.__file__, str(tar), str(idx)], check=True, capture_output=True)
    return idx.read_text()


def test_write_shards_splits_and_indexes(tmp_path):
    shards = write_shards(_samples(7), tmp_path, "part", samples_per_shard=3)
    assert [p.name for p in shards] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in shards] + [p.with_suffix(".idx").name for p in shards]
    )
    back = _read_back(shards)
    assert [s["__key__"] for s in back] == [f"s{i:04d}" for i in range(7)]
    assert back[4]["jpg"] == _jpeg(4) and back[4]["cls"] == b"4" and back[4]["seg.png"] == b"\x89PNG fake"
    header = shards[2].with_suffix(".idx").read_text().splitlines()[0]
    assert header == "v1.2 1"


def test_write_shards_is_atomic_when_interrupted(tmp_path):
    def samples():
        yield from _samples(4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(), tmp_path, "part", samples_per_shard=3)
    # The full first shard is kept; the half-written second one never appears under its final name.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.idx", "part-000000.tar"]


def test_write_shards_rejects_bad_samples(tmp_path):
    with pytest.raises(ValueError, match="without dots"):
        write_shards([{"__key__": "a.b", "jpg": b"x"}], tmp_path, "p", 2)
    with pytest.raises(ValueError, match="bytes"):
        write_shards([{"__key__": "a", "cls": 3}], tmp_path, "p", 2)
    with pytest.raises(DataError, match="samples_per_shard"):
        write_shards([], tmp_path, "p", 0)


def test_index_matches_dali_tool(tmp_path):
    (tar,) = write_shards(_samples(5), tmp_path, "part", samples_per_shard=10)
    assert tar.with_suffix(".idx").read_text() == _dali_index(tar, tmp_path / "dali.idx")


def test_index_matches_dali_tool_with_pax_headers(tmp_path):
    # webdataset's TarWriter with its default float mtime writes a pax header before every member, so data
    # offsets are no longer header + 512; the index must still point at the data.
    tar = tmp_path / "pax.tar"
    with wds.TarWriter(str(tar)) as writer:
        for sample in _samples(3):
            writer.write(sample)
    write_wds_index(tar, tmp_path / "ours.idx")
    ours = (tmp_path / "ours.idx").read_text()
    assert ours == _dali_index(tar, tmp_path / "dali.idx")
    ext, offset, size, name = ours.splitlines()[1].split()[:4]
    assert (ext, name) == ("cls", "s0000.cls")
    assert tar.read_bytes()[int(offset) : int(offset) + int(size)] == b"0"


def test_dali_reads_our_shards(tmp_path):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from nvidia.dali import fn, pipeline_def

    samples = _samples(6)
    shards = write_shards(samples, tmp_path, "part", samples_per_shard=4)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)  # CPU only
    def read():
        jpg, cls = fn.readers.webdataset(
            paths=[str(p) for p in shards],
            index_paths=[str(p.with_suffix(".idx")) for p in shards],
            ext=["jpg", "cls"],
            random_shuffle=False,
            name="reader",
        )
        return jpg, cls

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == len(samples)
    jpg, cls = pipe.run()
    assert np.array(jpg.at(0)).tobytes() == samples[0]["jpg"]
    assert np.array(cls.at(0)).tobytes() == samples[0]["cls"]


def test_index_of_empty_or_broken_tar_is_data_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="bad.tar"):
        write_wds_index(bad, tmp_path / "bad.idx")
    assert not (tmp_path / "bad.idx").exists()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Nested folder: 4 good images in 3 formats (one upper-case suffix), 2 bad ones, 1 non-image."""
    src = tmp_path / "src"
    (src / "a" / "deep").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "one.jpg").write_bytes(_jpeg(1))
    (src / "a" / "deep" / "two.JPG").write_bytes(_jpeg(2, size=(17, 23)))
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(src / "b" / "three.png")
    Image.new("RGB", (12, 12), (0, 255, 0)).save(src / "b" / "four.v2.webp")
    (src / "b" / "truncated.jpg").write_bytes(_jpeg(5, size=(64, 64))[:300])
    (src / "b" / "text.png").write_text("this is not an image")
    (src / "notes.txt").write_text("ignored")
    return src


def test_make_shards_from_folder(image_folder, tmp_path):
    out = tmp_path / "out"
    report = make_shards_from_folder(image_folder, out, samples_per_shard=3, prefix="train")
    assert report.written == 4
    assert sorted(p.name for p, _ in report.skipped) == ["text.png", "truncated.jpg"]
    assert all(reason for _, reason in report.skipped)
    assert [p.name for p in report.shards] == ["train-000000.tar", "train-000001.tar"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 4 and manifest["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(s["path"] for s in manifest["skipped"]) == ["b/text.png", "b/truncated.jpg"]

    back = {s["__key__"]: s for s in _read_back(report.shards)}
    assert sorted(back) == ["a_deep_two_JPG", "a_one_jpg", "b_four_v2_webp", "b_three_png"]
    assert back["a_one_jpg"]["jpg"] == _jpeg(1), "JPEGs are stored as they are"
    for sample in back.values():
        image = Image.open(io.BytesIO(sample["jpg"]))
        image.load()
        assert image.format == "JPEG" and image.mode == "RGB"
    # Transparent pixels are composited on white, not left as whatever colour hid under them.
    red = np.asarray(Image.open(io.BytesIO(back["b_three_png"]["jpg"])))
    assert abs(int(red[..., 1].mean()) - 127) < 10


def test_make_shards_from_folder_errors(tmp_path, image_folder):
    with pytest.raises(DataError, match="does not exist"):
        make_shards_from_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jpg"):
        make_shards_from_folder(tmp_path / "empty", tmp_path / "out")
    make_shards_from_folder(image_folder, tmp_path / "out")
    with pytest.raises(DataError, match="already holds"):
        make_shards_from_folder(image_folder, tmp_path / "out")
    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could be decoded"):
        make_shards_from_folder(bad_only, tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["skipped"][0]["path"] == "x.jpg"


def test_make_shards_in_parallel_writes_the_same_bytes(tmp_path, monkeypatch):
    from dtengine.data import shards as shards_module

    rng = np.random.default_rng(0)
    for i in range(24):
        pixels = rng.integers(0, 255, (int(rng.integers(20, 40)), 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{i:02d}.{'png' if i % 3 else 'jpg'}")
    (tmp_path / "img99.jpg").write_bytes(b"\xff\xd8\xff broken")
    outputs = {}
    for name, per_worker in (("serial", 10**9), ("parallel", 4)):
        monkeypatch.setattr(shards_module, "PARALLEL_MIN_IMAGES", per_worker)
        report = make_shards_from_folder(tmp_path, tmp_path.parent / f"out-{name}", samples_per_shard=10)
        assert report.written == 24 and [p.name for p, _ in report.skipped] == ["img99.jpg"]
        outputs[name] = [p.read_bytes() for p in report.shards]
    assert outputs["serial"] == outputs["parallel"] and len(outputs["serial"]) == 3

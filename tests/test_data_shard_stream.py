"""ShardStream: batch format, determinism, exact mid-epoch resume, corrupt samples, errors."""

import functools
import gc
import io
import multiprocessing
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtengine.data import (
    BatchCursor,
    DataConfig,
    ShardStream,
    builtin_dataset,
    resolve_shards,
    shard_stream,
    write_shards,
)
from dtengine.runtime.errors import ConfigError, DataError

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 train samples in 5 shards of 8, 8 val samples in 1 shard."""
    root = tmp_path_factory.mktemp("cache")
    return builtin_dataset(root, image_size=SIZE, num_train=40, num_val=8, samples_per_shard=8)


def _cfg(shards: str, **overrides) -> DataConfig:
    base = {"image_size": SIZE, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8}
    return DataConfig(shards=shards, **{**base, **overrides})


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _jpeg(seed: int, size: int = 24) -> bytes:
    out = io.BytesIO()
    pixels = np.full((size, size, 3), seed * 20 % 256, np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def corrupt_shard(tmp_path) -> Path:
    """One shard of 10 samples whose 5th holds a truncated JPEG; every image is a flat, distinct grey."""
    samples = [{"__key__": f"k{i:02d}", "jpg": _jpeg(i), "cls": str(i).encode()} for i in range(10)]
    samples[4]["jpg"] = _jpeg(4, size=64)[:200]
    (shard,) = write_shards(samples, tmp_path, "bad", samples_per_shard=10)
    return shard


def _same(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for key in x:
            if isinstance(x[key], torch.Tensor) and not torch.equal(x[key], y[key]):
                return False
            if not isinstance(x[key], torch.Tensor) and x[key] != y[key]:
                return False
    return True


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_format(dataset, num_workers):
    batches = list(ShardStream(_cfg(dataset.train_pattern, num_workers=num_workers), seed=0).epoch(0))
    assert len(batches) == 10  # 5 shards of 8 samples, whichever worker reads them: 40 / 4
    batch = batches[0]
    assert set(batch) == {"image", "seg", "cls", "skipped_corrupt"}
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["seg"].shape == (4, SIZE, SIZE) and batch["seg"].dtype == torch.int64
    assert batch["cls"].shape == (4,) and batch["cls"].dtype == torch.int64
    assert batch["skipped_corrupt"] == 0
    assert batch["seg"].max() < len(dataset.classes)
    images = torch.cat([b["image"] for b in batches]).flatten(1)
    assert len(torch.unique(images, dim=0)) == 40, "every sample exactly once per epoch"


def test_resize_and_centre_crop_with_labels(tmp_path):
    # A 60x40 image whose left and right thirds differ; seg marks the right third. After resizing the shorter
    # side to 32 (48x32) and cropping the centre 32x32, the image and label edges must stay aligned.
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 40:] = 255
    seg = np.zeros((40, 60), np.uint8)
    seg[:, 40:] = 3
    samples = [{"__key__": f"s{i}", "png": _png(image), "seg.png": _png(seg)} for i in range(2)]
    write_shards(samples, tmp_path, "geo", samples_per_shard=2)
    (batch,) = ShardStream(_cfg(str(tmp_path / "geo-*.tar"), batch_size=2, num_workers=0), seed=0).epoch(0)
    assert set(batch) == {"image", "seg", "skipped_corrupt"}
    labels, bright = batch["seg"][0], batch["image"][0, 0] > 127
    assert labels.shape == (SIZE, SIZE) and set(labels.unique().tolist()) == {0, 3}
    # Label edge at column (40 * 0.8 = 32) - 8 = 24; the bicubic image edge is within a pixel of it.
    assert (labels[:, 24:] == 3).all() and (labels[:, :24] == 0).all()
    assert (bright[:, 25:]).all() and not bright[:, :23].any()


def test_same_seed_and_epoch_give_identical_batches(dataset):
    stream = ShardStream(_cfg(dataset.train_pattern), seed=3)
    rng_before = torch.random.get_rng_state()
    first = list(stream.epoch(1))
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global torch RNG must not be used"
    assert _same(first, list(ShardStream(_cfg(dataset.train_pattern), seed=3).epoch(1)))
    assert not _same(first, list(stream.epoch(2)))
    assert not _same(first, list(ShardStream(_cfg(dataset.train_pattern), seed=4).epoch(1)))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_skip_batches_resumes_exactly(dataset, num_workers):
    stream = ShardStream(_cfg(dataset.train_pattern, num_workers=num_workers), seed=1)
    full = list(stream.epoch(5))
    for skip in (1, 3, 7, 9, 10, 12):  # 7 and 9 are past the point where some workers run dry (3 workers)
        assert _same(list(stream.epoch(5, skip_batches=skip)), full[skip:]), f"skip_batches={skip}"


def test_the_cursor_starts_the_next_epochs_workers_before_this_epoch_ends(dataset, monkeypatch):
    stream = ShardStream(_cfg(dataset.train_pattern, num_workers=2, prefetch=2), seed=0)
    length = stream.batches_per_epoch(0)
    want = list(stream.epoch(0)) + list(stream.epoch(1))
    cursor = BatchCursor(stream)
    started = []  # (epoch started, cursor's epoch, batches it had consumed of it)
    start_reading = stream._start_reading

    def spy(epoch, reading, skip_batches):
        started.append((epoch, cursor.epoch, cursor.batch_in_epoch))
        return start_reading(epoch, reading, skip_batches)

    monkeypatch.setattr(stream, "_start_reading", spy)
    got = [cursor.next() for _ in range(length + 1)]
    # 2 workers x prefetch 2 = 4 batches asked ahead: the next epoch starts when the last 4 have been asked for.
    assert started == [(1, 0, length - 4)]
    position = {k: v for k, v in cursor.state().items() if k != "loader"}
    resumed = BatchCursor(ShardStream(_cfg(dataset.train_pattern, num_workers=2, prefetch=2), seed=0), **position)
    got += [cursor.next() for _ in range(length - 1)]
    assert _same(got, want), "starting an epoch early changes no batch"
    assert started[1] == (2, 1, length - 4)
    assert _same([resumed.next() for _ in range(length - 1)], want[length + 1 :]), "the position saved is exact"
    cursor = resumed = None
    gc.collect()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "a dropped cursor leaves no workers behind"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_sample_skipped_and_counted(corrupt_shard, num_workers):
    cfg = _cfg(str(corrupt_shard), batch_size=3, shuffle_buffer=0, num_workers=num_workers)
    batches = list(ShardStream(cfg, seed=0).epoch(0))
    assert len(batches) == 3  # 9 good samples
    assert sum(b["skipped_corrupt"] for b in batches) == 1
    assert batches[1]["skipped_corrupt"] == 1  # sample 4 is dropped while batch 1 (samples 3, 5, 6) fills
    assert batches[1]["cls"].tolist() == [3, 5, 6]


def test_resume_past_corrupt_sample_is_exact(corrupt_shard):
    stream = ShardStream(_cfg(str(corrupt_shard), batch_size=2, shuffle_buffer=4, num_workers=0), seed=2)
    full = list(stream.epoch(0))
    assert sum(b["skipped_corrupt"] for b in full) == 1
    for skip in range(len(full) + 1):
        assert _same(list(stream.epoch(0, skip_batches=skip)), full[skip:]), f"skip_batches={skip}"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_sample_fails_with_one_line_data_error(corrupt_shard, num_workers):
    cfg = _cfg(str(corrupt_shard), on_corrupt="fail", batch_size=3, shuffle_buffer=0, num_workers=num_workers)
    with pytest.raises(DataError) as caught:
        list(ShardStream(cfg, seed=0).epoch(0))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("corrupt image 'k04' in shard ")
    assert str(corrupt_shard) in message and message.endswith("remove it or set data.on_corrupt=skip")


@pytest.mark.parametrize(("length", "message"), [(3000, "is truncated"), (2048, "cannot (index|read) shard")])
def test_broken_tar_is_data_error_naming_the_shard(tmp_path, corrupt_shard, length, message):
    broken = tmp_path / "broken-000000.tar"
    broken.write_bytes(corrupt_shard.read_bytes()[:length])  # 2048: whole blocks, but cut inside a member
    with pytest.raises(DataError, match=message) as caught:
        list(ShardStream(_cfg(str(broken), num_workers=1), seed=0).epoch(0))
    assert str(broken) in str(caught.value) and "\n" not in str(caught.value)


def test_pattern_matching_nothing_is_data_error(tmp_path):
    with pytest.raises(DataError, match="matched no files; check the path or create shards with"):
        resolve_shards(str(tmp_path / "nothing-{000000..000003}.tar"))
    with pytest.raises(DataError, match="matched no files"):
        ShardStream(_cfg(str(tmp_path / "*.tar")), seed=0)


def test_resolve_shards(dataset, monkeypatch):
    # "builtin" means the default-sized dataset; point it at the small one this module already generated.
    small = functools.partial(builtin_dataset, num_train=40, num_val=8, samples_per_shard=8)
    monkeypatch.setattr(shard_stream, "builtin_dataset", small)
    root = str(dataset.root.parent)
    train = resolve_shards("builtin", builtin_root=root, image_size=SIZE)
    assert [Path(p).name for p in train] == [f"train-{i:06d}.tar" for i in range(5)]
    assert resolve_shards("builtin:train", builtin_root=root, image_size=SIZE) == train
    assert [Path(p).name for p in resolve_shards("builtin:val", root, SIZE)] == ["val-000000.tar"]
    assert resolve_shards(str(dataset.root / "train-*.tar")) == train
    assert resolve_shards(str(dataset.root / "train-{000003..000009}.tar")) == train[3:]


def test_fewer_shards_than_ranks_x_workers_is_a_clear_error_without_resampling(dataset):
    with pytest.raises(ConfigError, match=r"1 shard\(s\) for 1 rank\(s\) x 2 worker\(s\).*data.resample=true"):
        ShardStream(_cfg(dataset.val_pattern, num_workers=2), seed=0)
    with pytest.raises(ConfigError, match="5 shard"):
        ShardStream(_cfg(dataset.train_pattern, num_workers=3), seed=0, rank=1, world_size=2)


def per_rank_batches(pattern: str, world: int, **overrides) -> list[list[dict]]:
    return [list(ShardStream(_cfg(pattern, **overrides), 0, rank, world).epoch(0)) for rank in range(world)]


def test_ranks_get_disjoint_data_and_the_same_number_of_batches(dataset):
    # 5 shards of 8 over 2 ranks x 2 workers: rank 0's workers can fill 4 + 2 batches of 4, rank 1's 2 + 2.
    stream = ShardStream(_cfg(dataset.train_pattern), 0, 0, 2)
    assert stream.batches_per_epoch(0) == 4
    per_rank = per_rank_batches(dataset.train_pattern, 2)
    assert [len(b) for b in per_rank] == [4, 4]
    images = torch.cat([b["image"] for batches in per_rank for b in batches]).flatten(1)
    assert len(torch.unique(images, dim=0)) == 32  # no sample on two ranks


@pytest.mark.parametrize("world", [2, 3])
def test_resampling_serves_more_ranks_x_workers_than_shards(dataset, world):
    per_rank = per_rank_batches(dataset.val_pattern, world, resample=True)  # 1 shard of 8, world x 2 workers
    assert [len(b) for b in per_rank] == [8 // (world * 4)] * world
    again = per_rank_batches(dataset.val_pattern, world, resample=True)
    assert all(_same(a, b) for a, b in zip(per_rank, again))  # seeded: the same draws every time


def test_a_rank_that_runs_dry_reads_its_shards_again(corrupt_shard, tmp_path):
    """10 samples, one corrupt: the index promises 2 batches of 5; the second pass over the shard fills it."""
    batches = list(ShardStream(_cfg(str(corrupt_shard), batch_size=5, num_workers=0), seed=0).epoch(0))
    assert len(batches) == 2 and sum(b["skipped_corrupt"] for b in batches) >= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"on_corrupt": "x"}, "data.on_corrupt must be 'skip' or 'fail', got 'x'"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"image_size": 2}, "data.image_size"),
        ({"shuffle_buffer": 1.5}, "data.shuffle_buffer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("'", ".")):
        DataConfig(**overrides)


def test_index_of_builtin_shards_counts_samples(dataset):
    # Shards written by the loader's own dataset carry DALI indexes with the right sample count.
    for shard in resolve_shards(dataset.train_pattern):
        with tarfile.open(shard) as archive:
            keys = {name.split(".")[0] for name in archive.getnames()}
        assert Path(shard).with_suffix(".idx").read_text().split("\n")[0] == f"v1.2 {len(keys)}"

"""The loaders behind `data.loader`: wds, dali, synthetic and auto, one interface, equal steps on every rank."""

from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dtengine.data import DataConfig, render_sample, write_shards
from dtengine.data import loaders as loaders_module
from dtengine.data.check import check_shards
from dtengine.data.loaders import SyntheticBatches, choose_loader, open_batches
from dtengine.data.shard_stream import ShardStream
from dtengine.runtime.errors import CheckpointError, DataError

from tiny import TINY_IMAGE


def cfg(shards: str, **overrides) -> DataConfig:
    base = {"image_size": TINY_IMAGE, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8}
    return DataConfig(shards=shards, **{**base, **overrides})


def photo_shard(tmp_path, count=12, sizes=(80, 127), seed=0):
    """Built-in-like pictures of mixed, non-square sizes as JPEGs (no labels), one shard."""
    rng, samples = np.random.default_rng(seed), []
    for i in range(count):
        picture, _, _ = render_sample(np.random.default_rng(i), 128)
        width, height = (int(x) for x in rng.integers(*sizes, 2))
        encoded = io.BytesIO()
        Image.fromarray(picture).resize((width, height), Image.BICUBIC).save(encoded, format="JPEG", quality=95)
        samples.append({"__key__": f"p{i:03d}", "jpg": encoded.getvalue()})
    (shard,) = write_shards(samples, tmp_path / f"photos{seed}", "photo", count)
    return str(shard)


def check_batch(batch: dict, size: int, batch_size: int = 4) -> None:
    image = batch["image"]
    assert image.shape == (batch_size, 3, size, size) and image.dtype == torch.uint8
    assert image.is_contiguous(memory_format=torch.channels_last)  # NHWC memory: the resizes write it directly
    assert image.float().std() > 1  # real pixels, not a constant
    if "seg" in batch:
        assert batch["seg"].shape == (batch_size, size, size) and batch["seg"].dtype == torch.int64
        assert int(batch["seg"].min()) >= 0 and int(batch["seg"].max()) < 5
        assert batch["cls"].shape == (batch_size,) and batch["cls"].dtype == torch.int64


# --------------------------------------------------------------------------------------------------- wds -----
@pytest.mark.parametrize(("crop", "num_workers"), [("center", 0), ("random_resized", 0), ("random_resized", 2)])
def test_wds_batches_with_labels_and_either_crop(tiny_shards, crop, num_workers):
    """Also from worker processes: the batches keep their NHWC memory on the way to the main process."""
    data = cfg(tiny_shards, crop=crop, crop_scale=[0.3, 1.0], loader="wds", num_workers=num_workers)
    batches, why = open_batches(data, seed=0)
    assert why.startswith("wds")
    batch = batches.next()
    check_batch(batch, TINY_IMAGE)
    assert batches.state() == {"loader": "wds", "epoch": 0, "batch_in_epoch": 1}


def square_samples(count: int = 8) -> list[dict]:
    """A white square on black, labelled 1 where it is white (PNG, so no JPEG ringing at its edge)."""
    picture = np.zeros((90, 120, 3), np.uint8)
    picture[20:70, 30:100] = 255
    seg = (picture[..., 0] > 0).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    labels = io.BytesIO()
    Image.fromarray(seg).save(labels, format="PNG")
    return [{"__key__": f"sq{i}", "png": png.getvalue(), "seg.png": labels.getvalue()} for i in range(count)]


def test_random_resized_crop_moves_image_and_labels_together(tmp_path):
    """After any crop of `square_samples`, white pixels are exactly label 1."""
    (shard,) = write_shards(square_samples(), tmp_path, "square", 8)
    data = cfg(str(shard), image_size=32, crop="random_resized", crop_scale=[0.2, 0.6], shuffle_buffer=0)
    batch = next(ShardStream(data, seed=3).epoch(0))
    white = batch["image"][:, 0] > 128
    agree = (white == (batch["seg"] == 1)).float().mean()
    assert agree > 0.95  # only resampling at the square's edge may differ; a box off by a few pixels fails
    assert len({tuple(b.flatten().tolist()) for b in batch["seg"]}) > 1  # the crops differ between samples


# -------------------------------------------------------------------------------------------- synthetic -----
def test_synthetic_batches_are_device_resident_keyed_and_resumable():
    batches = SyntheticBatches(cfg("builtin", batch_size=2), seed=0)
    first = batches.next()["image"]
    state = batches.state()
    second = batches.next()["image"]
    assert first.shape == (2, 3, TINY_IMAGE, TINY_IMAGE) and first.dtype == torch.uint8
    assert torch.equal(SyntheticBatches(cfg("builtin", batch_size=2), seed=0, state=state).next()["image"], second)


# ------------------------------------------------------------------------------------------------- auto -----
def test_auto_takes_wds_on_cpu_and_says_why(monkeypatch):
    assert choose_loader(cfg("builtin"), torch.device("cpu")) == (
        "wds",
        "auto: no CUDA device (DALI decodes on the GPU)",
    )
    from dtengine.data import dali

    monkeypatch.setattr(dali, "dali_unavailable_reason", lambda: "nvidia-dali is not usable (ImportError: none)")
    loader, why = choose_loader(cfg("builtin"), torch.device("cuda"))
    assert loader == "wds" and "not usable" in why


def test_a_checkpoint_of_another_loader_is_refused(tiny_shards):
    with pytest.raises(CheckpointError, match="resume with data.loader=synthetic"):
        open_batches(cfg(tiny_shards, loader="wds"), seed=0, state={"loader": "synthetic", "batches": 3})


# ------------------------------------------------------------------------------------------------- dali -----
@pytest.fixture
def dali_batches():
    """DaliBatches; the DALI tests skip cleanly where nvidia-dali is not installed."""
    pytest.importorskip("nvidia.dali")
    from dtengine.data.dali import DaliBatches

    return DaliBatches


@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_dali_batches_with_labels(dali_batches, tiny_shards, crop):
    batches = dali_batches(cfg(tiny_shards, crop=crop, crop_scale=[0.3, 1.0]), seed=0, labels=True)
    check_batch(batches.next(), TINY_IMAGE)


def test_dali_ranks_read_disjoint_samples_in_equal_steps(dali_batches, tiny_shards):
    """48 samples over 2 ranks (DALI splits by sample ranges): 6 batches of 4 each, no sample twice."""
    seen = []
    for rank in range(2):
        batches = dali_batches(cfg(tiny_shards), seed=0, rank=rank, world_size=2)
        assert batches.sizes.batches == 6
        images = [batches.next()["image"] for _ in range(6)]
        assert batches.epoch == 0 and batches.batch_in_epoch == 6
        seen += [tuple(image.flatten().tolist()) for batch in images for image in batch]
    assert len(seen) == 48 and len(set(seen)) == 48


def test_dali_resumes_exactly_from_its_state(dali_batches, tiny_shards):
    batches = dali_batches(cfg(tiny_shards, crop="random_resized"), seed=1)
    for _ in range(13):  # into the second epoch (12 batches each)
        batches.next()
    state = batches.state()
    assert state["loader"] == "dali" and state["epoch"] == 1 and state["pipeline"].dtype == torch.uint8
    want = [batches.next()["image"] for _ in range(3)]
    resumed, _ = open_batches(cfg(tiny_shards, crop="random_resized", loader="dali"), seed=1, state=state)
    assert all(torch.equal(a, resumed.next()["image"]) for a in want)


def test_dali_and_wds_give_the_same_centre_crops(dali_batches, tmp_path):
    """Same geometry (rounding half-way up), bicubic both: mean |difference| <= 2/255 over 80-127 px pictures."""
    shard = photo_shard(tmp_path)
    data = cfg(shard, image_size=48, batch_size=12, shuffle_buffer=0)
    from_dali = dali_batches(data, seed=0).next()["image"].float()
    from_wds = next(ShardStream(data, seed=0).epoch(0))["image"].float()
    difference = (from_dali - from_wds).abs()
    assert difference.mean() <= 2.0 and difference.mean(dim=(1, 2, 3)).max() <= 4.0


@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_dali_cpu_crops_match_dalis_own_resize(dali_batches, tmp_path, crop):
    """On the CPU, torch resizes what DALI decodes: the same crops as the pipeline that resizes inside DALI (the
    GPU's way) gives, within 2/255 on average (bicubic / bilinear, antialiased, in both)."""
    from dtengine.data import dali

    data = cfg(photo_shard(tmp_path), image_size=40, batch_size=12, shuffle_buffer=0, crop=crop)
    batches = dali_batches(data, seed=0)
    assert batches.resize_here
    from_torch = batches.next()["image"]
    assert from_torch.is_contiguous(memory_format=torch.channels_last)
    in_dali = dali._pipeline(data, batches.shards, 0, 0, 1, torch.device("cpu"), False, None, resize=True)
    from_dali = torch.from_numpy(in_dali.run()[0].as_array()).permute(0, 3, 1, 2)
    difference = (from_torch.float() - from_dali.float()).abs()
    assert difference.mean() <= 2.0 and difference.mean(dim=(1, 2, 3)).max() <= 4.0
    assert from_torch.float().std(dim=0).mean() > 5  # twelve different pictures, not one repeated


@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_dali_moves_image_and_labels_together(dali_batches, tmp_path, crop):
    """The white square of `square_samples`: after DALI's crop (resized by torch), white pixels are label 1."""
    samples = [{**s, "cls": b"1"} for s in square_samples()]
    (shard,) = write_shards(samples, tmp_path, "square", len(samples))
    data = cfg(str(shard), image_size=32, crop=crop, crop_scale=[0.2, 0.6], batch_size=8, shuffle_buffer=0)
    batch = dali_batches(data, seed=3, labels=True).next()
    white = batch["image"][:, 0] > 128
    assert (white == (batch["seg"] == 1)).float().mean() > 0.95
    assert batch["seg"].float().mean() > 0.1 and batch["cls"].tolist() == [1] * 8


def test_dali_stops_at_a_corrupt_sample_naming_it_and_check_shards_fixes_it(dali_batches, tmp_path):
    shard = photo_shard(tmp_path, count=8)
    from dtengine.data.pipeline import read_shards

    samples = [dict(s) for s in read_shards([{"url": shard}])]
    samples[5]["jpg"] = samples[5]["jpg"][:300]
    write_shards(samples, tmp_path / "bad", "bad", 8)
    bad = str(tmp_path / "bad" / "bad-000000.tar")

    def read_four_batches():
        batches = dali_batches(cfg(bad, batch_size=2, shuffle_buffer=0), seed=0)
        for _ in range(4):
            batches.next()

    with pytest.raises(DataError) as caught:
        read_four_batches()
    message = str(caught.value)
    caught = None  # DALI keeps the files a live pipeline maps: let the failed one go before rewriting the shard
    gc.collect()
    assert "\n" not in message and "'p005'" in message and bad in message and "check-shards --fix" in message
    (report,) = check_shards(bad, progress=False)
    assert report.broken and report.broken[0][0] == "p005" and not report.fixed
    (report,) = check_shards(bad, fix=True, progress=False)
    assert report.fixed and check_shards(bad, progress=False)[0].broken == []
    batches = dali_batches(cfg(bad, batch_size=7, shuffle_buffer=0), seed=0)
    assert batches.next()["image"].shape[0] == 7


def test_open_batches_names_dali(dali_batches, tiny_shards):
    batches, why = open_batches(cfg(tiny_shards, loader="dali"), seed=0)
    assert why == "dali (data.loader=dali)" and batches.next()["image"].shape[0] == 4


def test_wds_skips_and_counts_what_dali_refuses(tmp_path):
    shard = photo_shard(tmp_path, count=8)
    from dtengine.data.pipeline import read_shards

    samples = [dict(s) for s in read_shards([{"url": shard}])]
    samples[2]["jpg"] = samples[2]["jpg"][:300]
    (bad,) = write_shards(samples, tmp_path / "bad", "bad", 8)
    batches = list(ShardStream(cfg(str(bad), batch_size=3, shuffle_buffer=0), seed=0).epoch(0))
    assert len(batches) == 2 and sum(b["skipped_corrupt"] for b in batches) == 1


def test_loaders_module_lists_every_loader():
    assert set(loaders_module.__doc__.split()) >= {"wds", "dali", "synthetic", "auto"}


@pytest.mark.gpu
def test_dali_decodes_on_the_gpu_into_channels_last_batches(dali_batches, tmp_path):
    shard = photo_shard(tmp_path)
    data = cfg(shard, image_size=48, batch_size=12, shuffle_buffer=0)
    on_gpu = dali_batches(data, seed=0, device="cuda").next()["image"]
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    on_cpu = dali_batches(data, seed=0).next()["image"].float()
    assert (on_gpu.cpu().float() - on_cpu).abs().mean() <= 2.0  # nvJPEG and libjpeg-turbo round differently


@pytest.mark.parametrize("loader", ["wds", "dali", "synthetic"])
def test_every_loader_says_how_many_samples_an_epoch_leaves_unused(tiny_shards, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    # 48 samples (3 shards of 16) in batches of 5 on 2 ranks. DALI splits samples: 24 each, 4 full batches each,
    # 8 unused. wds splits shards: 32 and 16, so both stop at the 3 batches of the smaller, 18 unused. Synthetic
    # batches have no epoch to leave anything out of.
    unused = []
    for rank in range(2):
        batches, _ = open_batches(cfg(tiny_shards, batch_size=5, loader=loader), seed=0, rank=rank, world_size=2)
        unused.append(batches.unused_per_epoch())
    assert unused == {"wds": [18, 18], "dali": [8, 8], "synthetic": [0, 0]}[loader]

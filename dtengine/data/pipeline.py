"""Stages of the per-worker WebDataset pipeline that `ShardStream` runs in each DataLoader worker.

    shard urls -> this worker's share -> tar members -> samples -> [this rank's share] -> seeded shuffle
    -> skip already-consumed batches -> decode -> batch

Every stage is a picklable module-level object, reads its worker index from `torch.utils.data.get_worker_info`
at iteration time, and draws randomness only from seeds it was given, so the output depends only on
(seed, epoch, rank, number of workers).

Each worker's stream starts with one `{SKIPPED_BATCHES_KEY: n}` item saying how many whole batches it skipped,
and may end with a stats-only `{"skipped_corrupt": n}` item for corrupt samples found after its last batch.
"""

import os
import random
import tarfile
from collections.abc import Iterator
from itertools import islice

import webdataset as wds
from torch.utils.data import get_worker_info

from dtengine.data.decode import CorruptSample, collate, decode_sample, load_sample
from dtengine.runtime.errors import DataError

SKIPPED_BATCHES_KEY = "__skipped_batches__"


def worker_position() -> tuple[int, int]:
    """(index of this DataLoader worker, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class WorkerShards:
    """Source stage: the shards of this worker, `shards[worker::num_workers]`, as `{"url": path}` dicts."""

    def __init__(self, shards: list[str]):
        self.shards = shards

    def __call__(self) -> Iterator[dict]:
        worker, num_workers = worker_position()
        for url in self.shards[worker::num_workers]:
            yield {"url": url}


def read_shards(sources: Iterator[dict]) -> Iterator[dict]:
    """Raw samples of each shard in turn; a missing or broken tar becomes a `DataError` naming the shard."""
    for source in sources:
        url = source["url"]
        # tarfile silently ends a stream at a truncated header; tars are whole 512-byte blocks, so check that.
        if os.path.isfile(url) and os.path.getsize(url) % 512:
            raise DataError(f"shard '{url}' is truncated (size not a multiple of 512 bytes); re-create it or drop it")
        try:
            # One shard at a time, so the error can name it (webdataset's handlers only see the exception).
            yield from wds.tarfile_to_samples()(iter([{"url": url}]))
        except (OSError, tarfile.TarError, ValueError, EOFError) as err:  # ValueError: duplicate names in a sample
            raise DataError(f"cannot read shard '{url}' ({_first_arg(err)}); re-create it or drop it") from err


def _first_arg(err: Exception) -> str:
    return str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__


class TakeEvery:
    """Keep samples `offset, offset + stride, ...`: splits samples among ranks when there are too few shards."""

    def __init__(self, offset: int, stride: int):
        self.offset, self.stride = offset, stride

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        return islice(samples, self.offset, None, self.stride)


class SeededShuffle:
    """Buffer shuffle with a private RNG seeded from `seed` and the worker index (never the global RNGs)."""

    def __init__(self, bufsize: int, seed: str):
        self.bufsize, self.seed = bufsize, seed

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        worker, _ = worker_position()
        rng = random.Random(f"{self.seed}-worker{worker}")
        # initial=bufsize: fill the buffer completely before the first pick, for a better mix at the start.
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)


class DecodeAndBatch:
    """Skip `skip_batches` whole batches, then decode and batch the rest (the partial last batch is dropped).

    Skipping works on raw samples, before decoding. With on_corrupt="skip" each skipped sample is still loaded
    (not resized) so corrupt ones are not counted toward a batch, exactly as in an unskipped epoch; with "fail"
    an epoch that got this far had no corrupt samples, so skipping needs no decoding at all.

    Args:
        batch_size: Samples per batch.
        image_size: Output image side length.
        on_corrupt: "skip" or "fail".
        skip_batches: Whole batches of this worker to skip.
    """

    def __init__(self, batch_size: int, image_size: int, on_corrupt: str, skip_batches: int):
        self.batch_size, self.image_size = batch_size, image_size
        self.on_corrupt, self.skip_batches = on_corrupt, skip_batches

    def _skip(self, samples: Iterator[dict]) -> int:
        """Consume the samples of up to `skip_batches` batches; returns how many whole batches that was."""
        wanted, good = self.skip_batches * self.batch_size, 0
        while good < wanted:
            sample = next(samples, None)
            if sample is None:
                break
            if self.on_corrupt == "skip":
                try:
                    load_sample(sample, self.image_size)
                except CorruptSample:
                    continue  # counted by the unskipped epoch already; not again
            good += 1
        return good // self.batch_size

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        samples = iter(samples)
        yield {SKIPPED_BATCHES_KEY: self._skip(samples)}
        decoded, corrupt = [], 0
        for sample in samples:
            try:
                decoded.append(decode_sample(sample, self.image_size))
            except CorruptSample as bad:
                if self.on_corrupt == "fail":
                    raise DataError(
                        f"corrupt {bad.what} '{sample['__key__']}' in shard '{sample['__url__']}' ({bad.detail}); "
                        "remove it or set data.on_corrupt=skip"
                    ) from bad
                corrupt += 1
                continue
            if len(decoded) == self.batch_size:
                yield collate(decoded, corrupt)
                decoded, corrupt = [], 0
        if corrupt:
            yield {"skipped_corrupt": corrupt}

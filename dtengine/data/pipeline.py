"""Stages of the per-worker WebDataset pipeline that `ShardStream` runs in each DataLoader worker.

    shard urls -> this worker's share (or resampled) -> tar members -> samples -> seeded shuffle
    -> skip already-consumed batches -> decode (+ crop) -> batch

Every stage is a picklable module-level object, reads its worker index from `torch.utils.data.get_worker_info`
at iteration time, and draws randomness only from seeds it was given, so the output depends only on
(seed, epoch, rank, number of workers).

Each worker's stream starts with one `{SKIPPED_BATCHES_KEY: n}` item saying how many whole batches it skipped,
and may end with a stats-only `{"skipped_corrupt": n}` item for corrupt samples found after its last batch.
"""

import random
import tarfile
from collections.abc import Iterator

import webdataset as wds
from torch.utils.data import get_worker_info

from dtengine.data.decode import CorruptSample, Crop, collate, decode_sample, image_batch, load_sample
from dtengine.data.shards import check_tar_file
from dtengine.runtime.errors import DataError

SKIPPED_BATCHES_KEY = "__skipped_batches__"


def worker_position() -> tuple[int, int]:
    """(index of this DataLoader worker, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class WorkerShards:
    """Source stage: the shards of this worker, `shards[worker::num_workers]`, as `{"url": path}` dicts; or, with a
    `resample_seed`, shards drawn with replacement from all of them, forever, by a generator seeded per worker."""

    def __init__(self, shards: list[str], resample_seed: str | None = None):
        self.shards, self.resample_seed = shards, resample_seed

    def __call__(self) -> Iterator[dict]:
        worker, num_workers = worker_position()
        if self.resample_seed is None:
            for url in self.shards[worker::num_workers]:
                yield {"url": url}
            return
        rng = random.Random(f"{self.resample_seed}-worker{worker}")
        while True:
            yield {"url": rng.choice(self.shards)}


def read_shards(sources: Iterator[dict]) -> Iterator[dict]:
    """Raw samples of each shard in turn; a missing or broken tar becomes a `DataError` naming the shard."""
    for source in sources:
        url = source["url"]
        check_tar_file(url)  # not a tar at all, or cut short: say so (tarfile would not, or only vaguely)
        try:
            # One shard at a time, so the error can name it (webdataset's handlers only see the exception).
            yield from wds.tarfile_to_samples()(iter([{"url": url}]))
        except (OSError, tarfile.TarError, ValueError, EOFError) as err:  # ValueError: duplicate names in a sample
            raise DataError(f"cannot read shard '{url}' ({_first_arg(err)}); re-create it or drop it") from err


def _first_arg(err: Exception) -> str:
    return str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__


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
        crop: Output size and crop kind.
        on_corrupt: "skip" or "fail".
        skip_batches: Whole batches of this worker to skip.
        seed: Keys each sample's random crop with its key (so skipping never shifts later crops, and moving the
            shards changes nothing).
        max_corrupt_in_a_row: stop with an error after this many corrupt samples in a row; for endless (resampled)
            streams, which would otherwise skip forever when nothing decodes. None: no limit.
    """

    def __init__(
        self, batch_size: int, crop: Crop, on_corrupt: str, skip_batches: int, seed: str = "",
        max_corrupt_in_a_row: int | None = None,
    ):  # fmt: skip
        self.batch_size, self.crop, self.seed = batch_size, crop, seed
        self.on_corrupt, self.skip_batches = on_corrupt, skip_batches
        self.max_corrupt_in_a_row = max_corrupt_in_a_row

    def _skip(self, samples: Iterator[dict]) -> int:
        """Consume the samples of up to `skip_batches` batches; returns how many whole batches that was."""
        wanted, good = self.skip_batches * self.batch_size, 0
        while good < wanted:
            sample = next(samples, None)
            if sample is None:
                break
            if self.on_corrupt == "skip":
                try:
                    load_sample(sample, self.crop.size)
                except CorruptSample:
                    continue  # counted by the unskipped epoch already; not again
            good += 1
        return good // self.batch_size

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        samples = iter(samples)
        yield {SKIPPED_BATCHES_KEY: self._skip(samples)}
        decoded, corrupt, in_a_row = [], 0, 0
        images = image_batch(self.batch_size, self.crop.size)  # each image is decoded straight into its slot
        for sample in samples:
            try:
                rng = random.Random(f"{self.seed}-{sample['__key__']}")
                decoded.append(decode_sample(sample, self.crop, rng, out=images[len(decoded)]))
            except CorruptSample as bad:
                if self.on_corrupt == "fail":
                    raise DataError(
                        f"corrupt {bad.what} '{sample['__key__']}' in shard '{sample['__url__']}' ({bad.detail}); "
                        "remove it or set data.on_corrupt=skip"
                    ) from bad
                corrupt, in_a_row = corrupt + 1, in_a_row + 1
                if self.max_corrupt_in_a_row is not None and in_a_row >= self.max_corrupt_in_a_row:
                    raise DataError(
                        f"{in_a_row} samples in a row do not decode (the last: '{sample['__key__']}' in shard "
                        f"'{sample['__url__']}': {bad.detail}); check the shards with `dtengine check-shards`"
                    ) from bad
                continue
            in_a_row = 0
            if len(decoded) == self.batch_size:
                yield collate(decoded, corrupt, images)
                decoded, corrupt = [], 0
                images = image_batch(self.batch_size, self.crop.size)
        if corrupt:
            yield {"skipped_corrupt": corrupt}

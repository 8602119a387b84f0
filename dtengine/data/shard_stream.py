"""Deterministic, resumable batches from WebDataset shards.

    stream = ShardStream(DataConfig(shards="data/train-{000000..000099}.tar"), seed=0, rank=0, world_size=1)
    for batch in stream.epoch(3, skip_batches=120):   # continue epoch 3 after 120 consumed batches
        batch["image"]  # uint8 (B, 3, S, S)

The order of batches depends only on (seed, epoch, rank, world_size, number of workers): shards are shuffled per
epoch with a string-seeded `random.Random`, split across ranks and then DataLoader workers, and samples are
shuffled in a buffer with per-worker seeded RNGs. Torch's global RNG is neither used nor advanced.

Limitations: ranks may get different numbers of batches when shards hold different numbers of samples; corrupt
samples found after a worker's last full batch are only reported by a warning at the end of the epoch.
"""

import glob
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from dtengine.data.builtin import builtin_dataset
from dtengine.data.pipeline import (
    SKIPPED_BATCHES_KEY,
    DecodeAndBatch,
    SeededShuffle,
    TakeEvery,
    WorkerShards,
    read_shards,
)
from dtengine.runtime.errors import ConfigError, DataError

_BUILTIN = {"builtin": "train", "builtin:train": "train", "builtin:val": "val"}


@dataclass
class DataConfig:
    """Input pipeline: which shards to read and how to turn them into batches."""

    shards: str = "builtin"
    """Brace/glob pattern of .tar shards (e.g. `data/train-{000000..000099}.tar`), or "builtin" / "builtin:val"
    for the built-in shapes dataset (generated and cached on first use)."""
    image_size: int = 64
    """Images are resized (shorter side) and centre-cropped to this square size; label maps likewise."""
    batch_size: int = 16
    """Samples per batch (per rank). The partial last batch of each worker is dropped."""
    num_workers: int = 2
    """DataLoader worker processes (0 = decode in the main process). Capped at the number of shards per rank."""
    shuffle_buffer: int = 512
    """Samples held in each worker's shuffle buffer (0 = no sample shuffling; shards are still shuffled)."""
    on_corrupt: str = "skip"
    """What to do with undecodable samples: 'skip' drops them and counts them in the batch's "skipped_corrupt";
    'fail' stops with a DataError naming the sample and its shard."""
    builtin_root: str = ""
    """Cache folder of the built-in dataset ("" = `$DTENGINE_CACHE`, default `~/.cache/dtengine`)."""
    val_shards: str = ""
    """Held-out shards for `train.val_every` ("" = "builtin:val" when `shards` is built-in; other shards need
    their own)."""

    def __post_init__(self):
        for name, minimum in (("image_size", 8), ("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
        if self.on_corrupt not in ("skip", "fail"):
            raise ConfigError(f"data.on_corrupt must be 'skip' or 'fail', got {self.on_corrupt!r}")
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ConfigError(f"data.shards must be a shard pattern or 'builtin', got {self.shards!r}")


def resolve_shards(pattern: str, builtin_root: str = "", image_size: int = 64) -> list[str]:
    """The shard files a pattern names, sorted; generates the built-in dataset if the pattern asks for it.

    Args:
        pattern: "builtin", "builtin:train", "builtin:val", or a brace and/or glob pattern of .tar files,
            e.g. `data/train-{000000..000099}.tar` or `data/*/train-*.tar`.
        builtin_root: Cache folder of the built-in dataset ("" = default).
        image_size: Image size of the built-in dataset.

    Returns:
        Paths of the existing files it matches, sorted and without duplicates.

    Raises:
        DataError: nothing matched.
    """
    if pattern.strip() in _BUILTIN:
        dataset = builtin_dataset(builtin_root or None, image_size=image_size)
        split = _BUILTIN[pattern.strip()]
        pattern = dataset.train_pattern if split == "train" else dataset.val_pattern
    found = set()
    for expanded in braceexpand(os.path.expanduser(pattern)):
        found.update(path for path in glob.glob(expanded) if os.path.isfile(path))
    if not found:
        raise DataError(
            f"data.shards '{pattern}' matched no files; check the path or create shards with "
            "`dtengine make-shards --from-folder DIR --out DIR`"
        )
    return sorted(found)


def _unwrap_worker_error(err: DataError) -> DataError:
    """The one-line DataError a worker raised, from the multi-line traceback text DataLoader re-raises it with."""
    lines = str(err).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return DataError(lines[-1].partition("DataError: ")[2] or lines[-1])
    return err


class ShardStream:
    """Batches from shards, one epoch at a time; see the module docstring for ordering and determinism.

    Args:
        cfg: The data config; shards are resolved (and the built-in dataset generated) here.
        seed: Base seed of shard and sample shuffling.
        rank: This process's rank in distributed training.
        world_size: Number of ranks. With at least as many shards as ranks, each rank reads its own shards;
            with fewer, every rank reads all shards and keeps every world_size-th sample.
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.shards = resolve_shards(cfg.shards, cfg.builtin_root, cfg.image_size)
        self.split_samples = len(self.shards) < world_size  # too few shards to give every rank its own
        shards_here = len(self.shards) if self.split_samples else len(self.shards[rank::world_size])
        self.num_workers = min(cfg.num_workers, shards_here)
        if self.num_workers < cfg.num_workers:
            warnings.warn(
                f"data.shards has {len(self.shards)} shard(s) for {cfg.num_workers} workers x {world_size} rank(s); "
                f"using {self.num_workers} worker(s) per rank (write more, smaller shards to use them all)",
                stacklevel=2,
            )

    def _epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shards for `epoch`, in reading order."""
        shards = list(self.shards)
        # A string seed is hashed deterministically by `random` (unlike hash(str), which is salted per process).
        random.Random(f"{self.seed}-{epoch}").shuffle(shards)
        return shards if self.split_samples else shards[self.rank :: self.world_size]

    def _loader(self, epoch: int, worker_skip: int) -> DataLoader:
        cfg = self.cfg
        pipeline = wds.DataPipeline(
            WorkerShards(self._epoch_shards(epoch)),
            read_shards,
            TakeEvery(self.rank, self.world_size) if self.split_samples else None,
            SeededShuffle(cfg.shuffle_buffer, f"{self.seed}-{epoch}-rank{self.rank}") if cfg.shuffle_buffer else None,
            DecodeAndBatch(cfg.batch_size, cfg.image_size, cfg.on_corrupt, worker_skip),
        )
        # The generator only seeds the workers' base seed; passing one keeps torch's global RNG untouched.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
        )

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of one epoch, optionally starting after the first `skip_batches` of them.

        `epoch(e, skip_batches=k)` yields exactly what `epoch(e)` yields from its k-th batch on. Workers skip
        their share of the k batches on raw samples before decoding; the main process drops the few left over
        (fewer than the number of workers, except near the end of the epoch).

        Args:
            epoch: Epoch number; each epoch has its own shard and sample order.
            skip_batches: Batches of this epoch already consumed (e.g. before a checkpoint).

        Yields:
            "image": uint8 (B, 3, S, S); "seg": int64 (B, S, S), if every sample has "seg.png"; "cls": int64 (B,),
            if every sample has "cls"; "skipped_corrupt": int, corrupt samples dropped since the previous batch.

        Raises:
            DataError: a shard cannot be read, or (with on_corrupt="fail") a sample is corrupt.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        # DataLoader (in order) takes one item from each worker in turn, dropping workers that run dry, so the
        # first k batches hold k // workers of every worker's batches unless a worker ran dry before that; each
        # worker reports how many it really skipped and we drop the difference here.
        workers = max(1, self.num_workers)
        batches = iter(self._loader(epoch, worker_skip=skip_batches // workers))
        skipped_by_workers, dropped, corrupt = 0, 0, 0
        try:
            while True:
                try:
                    item = next(batches)
                except StopIteration:
                    break
                except DataError as err:
                    raise _unwrap_worker_error(err) from err
                if SKIPPED_BATCHES_KEY in item:  # the first item of every worker, before any batch
                    skipped_by_workers += item[SKIPPED_BATCHES_KEY]
                    continue
                corrupt += item["skipped_corrupt"]
                if "image" not in item:  # stats-only: corrupt samples after a worker's last batch
                    continue
                if dropped < skip_batches - skipped_by_workers:
                    dropped, corrupt = dropped + 1, 0  # that batch reported them in the run being resumed
                    continue
                item["skipped_corrupt"], corrupt = corrupt, 0
                yield item
        finally:
            # Stop the workers now, not when the iterator is garbage collected: an exception's traceback keeps it
            # alive, and a late shutdown waits 5 s per worker for them to notice.
            getattr(batches, "_shutdown_workers", lambda: None)()
        if corrupt:
            warnings.warn(f"{corrupt} corrupt sample(s) dropped after the last batch of epoch {epoch}", stacklevel=2)


class BatchCursor:
    """Endless batches from a `ShardStream`, epoch after epoch, tracking (epoch, batches consumed in it) so a
    checkpoint can record the position and a resume can seek back to it."""

    def __init__(self, stream: ShardStream, epoch: int = 0, batch_in_epoch: int = 0):
        self.stream, self.epoch, self.batch_in_epoch = stream, epoch, batch_in_epoch
        self._batches: Iterator[dict] = stream.epoch(epoch, skip_batches=batch_in_epoch)

    def next(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self._batches)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._batches = self.stream.epoch(self.epoch)
        raise ConfigError("the training shards yield no full batch; lower data.batch_size or add data")


def held_out_shards(cfg: DataConfig) -> str:
    """The held-out shard pattern of `cfg` (see `DataConfig.val_shards`)."""
    if cfg.val_shards.strip():
        return cfg.val_shards
    if cfg.shards.strip() in _BUILTIN:
        return "builtin:val"
    raise ConfigError("train.val_every needs held-out shards: set data.val_shards to a shard pattern")

"""Deterministic, resumable batches from WebDataset shards (the `wds` loader), the same number on every rank.

    stream = ShardStream(DataConfig(shards="data/train-{000000..000099}.tar"), seed=0, rank=0, world_size=1)
    for batch in stream.epoch(3, skip_batches=120):   # continue epoch 3 after 120 consumed batches
        batch["image"]  # uint8 (B, 3, S, S)

The order of batches depends only on (seed, epoch, rank, world_size, number of workers): shards are shuffled per
epoch with a string-seeded `random.Random`, split across ranks and then DataLoader workers, and samples are
shuffled in a buffer with per-worker seeded RNGs; a random crop is keyed by (seed, epoch, sample key). Torch's
global RNG is neither used nor advanced.

Equal steps: every rank yields the same number of batches per epoch, computed from the shards' sample counts (read
from their DALI index files) before reading: the smallest number any rank's workers can fill. A rank whose shards
hold more stops there; one that runs dry early (corrupt samples skipped) reads its shards again, reshuffled, until
it gets there. With `data.resample=true` every worker draws shards with replacement instead (any number of ranks x
workers, even more than shards) and an epoch is the dataset's size over the global batch.
"""

import glob
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from dtengine.data.builtin import builtin_dataset
from dtengine.data.decode import CROPS, Crop
from dtengine.data.pipeline import SKIPPED_BATCHES_KEY, DecodeAndBatch, SeededShuffle, WorkerShards, read_shards
from dtengine.data.shards import ensure_index
from dtengine.runtime.errors import ConfigError, DataError

_BUILTIN = {"builtin": "train", "builtin:train": "train", "builtin:val": "val"}
LOADERS = ("auto", "dali", "wds", "synthetic")
MAX_PASSES = 8  # re-reads of a rank's shards to fill an epoch before concluding they hold too few good samples


@dataclass
class DataConfig:
    """Input pipeline: which shards to read and how to turn them into batches."""

    shards: str = "builtin"
    """Brace/glob pattern of .tar shards (e.g. `data/train-{000000..000099}.tar`), or "builtin" / "builtin:val"
    for the built-in shapes dataset (generated and cached on first use)."""
    loader: str = "auto"
    """"wds" (WebDataset shards decoded by PIL in DataLoader workers), "dali" (NVIDIA DALI over the same shards;
    decoding on the GPU on CUDA), "synthetic" (random device-resident batches: the compute-only ceiling) or
    "auto" (DALI on CUDA when it is installed and works, wds otherwise; the run's log says which and why)."""
    image_size: int = 64
    """Images are cropped to this square size (see `crop`); label maps likewise."""
    crop: str = "center"
    """"center": resize the shorter side to image_size and crop the centre (the paper's recipe); "random_resized":
    a random box of `crop_scale` x the area and aspect ratio in `crop_ratio`, resized to image_size."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Area range of the random_resized box, as fractions of the image's area."""
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """Aspect-ratio range (width / height) of the random_resized box."""
    batch_size: int = 16
    """Samples per batch (per rank). Every rank gets the same number of full batches per epoch."""
    num_workers: int = 2
    """Decoding processes per rank (DataLoader workers for wds, threads for DALI; 0 = in the main process). Without
    resampling every worker needs a shard of its own: shards >= ranks x workers."""
    prefetch: int = 4
    """Batches each wds worker (or the DALI pipeline) prepares ahead."""
    resample: bool = False
    """Draw shards with replacement (each worker its own seeded sequence) instead of reading each once per epoch:
    works with more ranks x workers than shards; an epoch is then the dataset's size over the global batch."""
    shuffle_buffer: int = 512
    """Samples held in each worker's shuffle buffer (0 = no sample shuffling; shards are still shuffled)."""
    on_corrupt: str = "skip"
    """What to do with undecodable samples: 'skip' drops them and counts them in the batch's "skipped_corrupt"
    (wds); 'fail' stops with a DataError naming the sample and its shard. DALI always stops (see
    `dtengine check-shards --fix`)."""
    builtin_root: str = ""
    """Cache folder of the built-in dataset ("" = `$DTENGINE_CACHE`, default `~/.cache/dtengine`)."""
    val_shards: str = ""
    """Held-out shards for `train.val_every` ("" = "builtin:val" when `shards` is built-in; other shards need
    their own)."""

    def __post_init__(self):
        for name, minimum in (
            ("image_size", 8), ("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0), ("prefetch", 1)
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
        if self.on_corrupt not in ("skip", "fail"):
            raise ConfigError(f"data.on_corrupt must be 'skip' or 'fail', got {self.on_corrupt!r}")
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ConfigError(f"data.shards must be a shard pattern or 'builtin', got {self.shards!r}")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.crop not in CROPS:
            raise ConfigError(f"data.crop must be one of {CROPS}, got {self.crop!r}")
        scale, ratio = list(self.crop_scale), list(self.crop_ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1 or len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(
                f"data.crop_scale must be [a, b] with 0 < a <= b <= 1 and data.crop_ratio [r, s] with 0 < r <= s, "
                f"got {scale} and {ratio}"
            )

    @property
    def crop_spec(self) -> Crop:
        return Crop(self.image_size, self.crop, tuple(self.crop_scale), tuple(self.crop_ratio))


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
    """Batches from shards, one epoch at a time; see the module docstring for ordering, determinism and equal steps.

    Args:
        cfg: The data config; shards are resolved (and the built-in dataset generated) here.
        seed: Base seed of shard and sample shuffling.
        rank: This process's rank in distributed training.
        world_size: Number of ranks.

    Raises:
        ConfigError: fewer shards than ranks x workers without `resample`.
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.shards = resolve_shards(cfg.shards, cfg.builtin_root, cfg.image_size)
        self.num_workers = cfg.num_workers
        readers = world_size * max(1, cfg.num_workers)
        if not cfg.resample and len(self.shards) < readers:
            raise ConfigError(
                f"data.shards has {len(self.shards)} shard(s) for {world_size} rank(s) x {max(1, cfg.num_workers)} "
                "worker(s), and every worker needs its own shard: write more, smaller shards (`dtengine make-shards "
                "--samples-per-shard`), lower data.num_workers, or set data.resample=true"
            )
        self.counts = {shard: ensure_index(shard) for shard in self.shards}

    def _epoch_shards(self, epoch: int, rank: int, reading: int = 0) -> list[str]:
        """The shards `rank` reads in `epoch` (its `reading`-th pass over them), in reading order."""
        shards = list(self.shards)
        # A string seed is hashed deterministically by `random` (unlike hash(str), which is salted per process).
        random.Random(f"{self.seed}-{epoch}" + (f"-pass{reading}" if reading else "")).shuffle(shards)
        return shards[rank :: self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        """The batches every rank yields in `epoch`: the fewest any rank's workers can fill from their shards."""
        batch, workers = self.cfg.batch_size, max(1, self.num_workers)
        if self.cfg.resample:
            return sum(self.counts.values()) // (self.world_size * batch)
        per_rank = []
        for rank in range(self.world_size):
            shards = self._epoch_shards(epoch, rank)
            per_rank.append(sum(sum(self.counts[s] for s in shards[w::workers]) // batch for w in range(workers)))
        return min(per_rank)

    def _loader(self, epoch: int, reading: int, worker_skip: int) -> DataLoader:
        cfg, name = self.cfg, f"{self.seed}-{epoch}-rank{self.rank}" + (f"-pass{reading}" if reading else "")
        source = WorkerShards(
            self.shards if cfg.resample else self._epoch_shards(epoch, self.rank, reading),
            resample_seed=name if cfg.resample else None,
        )
        # Resampling never runs dry: give up once a worker has skipped as many samples in a row as the shards hold.
        give_up_after = max(1, sum(self.counts.values())) if cfg.resample else None
        pipeline = wds.DataPipeline(
            source,
            read_shards,
            SeededShuffle(cfg.shuffle_buffer, name) if cfg.shuffle_buffer else None,
            DecodeAndBatch(
                cfg.batch_size, cfg.crop_spec, cfg.on_corrupt, worker_skip, f"{self.seed}-{epoch}", give_up_after
            ),
        )
        # The generator only seeds the workers' base seed; passing one keeps torch's global RNG untouched.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=cfg.prefetch if self.num_workers else None,
        )

    def _start_reading(self, epoch: int, reading: int, skip_batches: int) -> Iterator[dict]:
        """The live DataLoader iterator of one pass over this rank's shards: its workers start now and begin
        filling their prefetch queues, before the first batch is asked for."""
        return iter(self._loader(epoch, reading, worker_skip=skip_batches // max(1, self.num_workers)))

    def _reading(self, batches: Iterator[dict], skip_batches: int, seen: list[int]) -> Iterator[dict]:
        """One pass over this rank's shards (`batches`, from `_start_reading`), from its `skip_batches`-th batch on.
        `seen` = [batches of the pass, skipped or yielded; corrupt samples found after its last batch], filled as
        it goes."""
        # DataLoader (in order) takes one item from each worker in turn, dropping workers that run dry, so the
        # first k batches hold k // workers of every worker's batches unless a worker ran dry before that; each
        # worker reports how many it really skipped and we drop the difference here.
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
                    seen[0] += item[SKIPPED_BATCHES_KEY]
                    continue
                corrupt += item["skipped_corrupt"]
                if "image" not in item:  # stats-only: corrupt samples after a worker's last batch
                    continue
                seen[0] += 1
                if dropped < skip_batches - skipped_by_workers:
                    dropped, corrupt = dropped + 1, 0  # that batch reported them in the run being resumed
                    continue
                item["skipped_corrupt"], corrupt = corrupt, 0
                yield item
        finally:
            # Stop the workers now, not when the iterator is garbage collected: an exception's traceback keeps it
            # alive, and a late shutdown waits 5 s per worker for them to notice.
            getattr(batches, "_shutdown_workers", lambda: None)()
        seen[1] += corrupt

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The `batches_per_epoch(epoch)` batches of one epoch, optionally starting after the first `skip_batches`.

        `epoch(e, skip_batches=k)` yields exactly what `epoch(e)` yields from its k-th batch on. Workers skip
        their share of the k batches on raw samples before decoding; the main process drops the few left over
        (fewer than the number of workers, except near the end of the epoch). The workers start when `epoch` is
        called, not at the first batch, so a caller can start the next epoch while this one's last batches are
        consumed (`BatchCursor` does).

        Args:
            epoch: Epoch number; each epoch has its own shard and sample order.
            skip_batches: Batches of this epoch already consumed (e.g. before a checkpoint).

        Yields:
            "image": uint8 (B, 3, S, S); "seg": int64 (B, S, S), if every sample has "seg.png"; "cls": int64 (B,),
            if every sample has "cls"; "skipped_corrupt": int, corrupt samples dropped since the previous batch.

        Raises:
            DataError: a shard cannot be read, (with on_corrupt="fail") a sample is corrupt, or the shards hold
                too few decodable samples to fill an epoch.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        wanted = self.batches_per_epoch(epoch)
        if skip_batches >= wanted:
            return iter(())
        return self._epoch_batches(epoch, wanted, skip_batches, self._start_reading(epoch, 0, skip_batches))

    def _epoch_batches(self, epoch: int, wanted: int, skip_batches: int, first_pass: Iterator[dict]) -> Iterator[dict]:
        """`epoch`'s `wanted` batches after `skip_batches`, reading its first pass from the started `first_pass`."""
        done, to_skip, carried = skip_batches, skip_batches, 0
        for reading in range(MAX_PASSES + 1):
            if done >= wanted:
                return
            seen = [0, 0]  # the pass's batches (skipped or yielded), corrupt samples after its last batch
            started = first_pass if reading == 0 else self._start_reading(epoch, reading, to_skip)
            passage = self._reading(started, to_skip, seen)
            try:
                for item in passage:
                    item["skipped_corrupt"] += carried
                    carried = 0
                    yield item
                    done += 1
                    if done == wanted:
                        return
            finally:
                passage.close()
            if seen[0] == 0:
                break
            carried += seen[1]  # reported with the next batch, from the next pass
            to_skip = max(0, to_skip - seen[0])  # ran dry early: read the shards again, reshuffled
        samples = sum(self.counts[shard] for shard in self._epoch_shards(epoch, self.rank))
        if seen[0] == 0 and seen[1] >= samples > 0:
            raise DataError(
                f"rank {self.rank}'s shards hold no decodable samples (all {samples} are corrupt); see why with "
                f"`dtengine check-shards '{self.cfg.shards}'`, then re-create the shards"
            )
        raise DataError(
            f"rank {self.rank}'s shards hold too few decodable samples for {wanted} batches of {self.cfg.batch_size} "
            f"in epoch {epoch} (corrupt samples?); check them with `dtengine check-shards`"
        )


class BatchCursor:
    """Endless batches from a `ShardStream`, epoch after epoch, tracking (epoch, batches consumed in it) so a
    checkpoint can record the position and a resume can seek back to it.

    The next epoch's workers start while this epoch's last batches are consumed: once every batch left in the
    epoch has been asked of the current workers (prefetch x workers of them), which have nothing new to start.
    Started only at the epoch's end, they stall the step while they open shards and decode their first batches:
    about 0.47 s per epoch of the paper step on an H200 (8 workers). `early_start=False` starts them there (two
    sets of workers never overlap).
    """

    def __init__(self, stream: ShardStream, epoch: int = 0, batch_in_epoch: int = 0, early_start: bool = True):
        self.stream, self.epoch, self.batch_in_epoch = stream, epoch, batch_in_epoch
        self._batches: Iterator[dict] = stream.epoch(epoch, skip_batches=batch_in_epoch)
        self._epoch_length = stream.batches_per_epoch(epoch)
        self._next_epoch: Iterator[dict] | None = None
        # The batches a DataLoader asks of its workers ahead of the one being consumed; none without workers.
        self._lead = stream.num_workers * stream.cfg.prefetch if early_start else 0

    def unused_per_epoch(self) -> int:
        """Samples of an epoch no rank's batches take (partial batches; ranks held to equal steps)."""
        stream = self.stream
        if stream.cfg.resample:
            return 0
        total = sum(stream.counts.values())
        return total - stream.batches_per_epoch(self.epoch) * stream.cfg.batch_size * stream.world_size

    def state(self) -> dict:
        """The position a checkpoint stores: (epoch, batches consumed in it)."""
        return {"loader": "wds", "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def next(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self._batches)
                self.batch_in_epoch += 1
                if self._next_epoch is None and self._lead and self._epoch_length - self.batch_in_epoch <= self._lead:
                    self._next_epoch = self.stream.epoch(self.epoch + 1)
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._batches, self._next_epoch = self._next_epoch or self.stream.epoch(self.epoch), None
                self._epoch_length = self.stream.batches_per_epoch(self.epoch)
        cfg, total = self.stream.cfg, sum(self.stream.counts.values())
        if total == 0:
            raise DataError(
                f"the training shards '{cfg.shards}' hold no samples; check them with `dtengine check-shards "
                f"'{cfg.shards}'` and re-create them (`dtengine make-shards`)"
            )
        raise ConfigError(
            f"the training shards yield no full batch ({total} samples, batches of {cfg.batch_size} filled by each of "
            f"{self.stream.world_size} rank(s) x {max(1, self.stream.num_workers)} worker(s) from its own shards); "
            "lower data.batch_size or data.num_workers, or add data"
        )


def held_out_shards(cfg: DataConfig) -> str:
    """The held-out shard pattern of `cfg` (see `DataConfig.val_shards`)."""
    if cfg.val_shards.strip():
        return cfg.val_shards
    if cfg.shards.strip() in _BUILTIN:
        return "builtin:val"
    raise ConfigError("train.val_every needs held-out shards: set data.val_shards to a shard pattern")

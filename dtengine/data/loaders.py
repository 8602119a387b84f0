"""Choosing and opening the loader a run reads batches from (`data.loader`), all behind one small interface:

batches.next()   -> {"image": uint8 (B, 3, S, S), "skipped_corrupt": int, ...}
batches.epoch    the epoch the next batch belongs to
batches.state()  what a checkpoint stores so that `open_batches(..., state=...)` continues exactly
batches.unused_per_epoch()  samples of an epoch no batch takes (ranks are held to equal, full batches)

wds        `ShardStream` through `BatchCursor` (PIL decoding in DataLoader workers; skips and counts corrupt
           samples)
dali       `DaliBatches` (GPU decoding on CUDA)
synthetic  `SyntheticBatches`: random batches made on the device, no input at all: the compute-only ceiling
auto       dali on CUDA when it is installed and works, wds otherwise
"""

from __future__ import annotations

import torch

from dtengine.data.shard_stream import BatchCursor, DataConfig, ShardStream
from dtengine.runtime.errors import CheckpointError

SYNTHETIC_EPOCH = 1000
"""Batches in a synthetic "epoch" (there is no dataset to count)."""


class SyntheticBatches:
    """Random uint8 images of the configured shape, made on the device. Image i of a rank's n-th batch is keyed by
    (seed, n, rank x batch + i), so N ranks x batch b see exactly the images of 1 rank x batch N b."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, device: torch.device | str = "cpu",
                 state: dict | None = None):  # fmt: skip
        self.cfg, self.seed, self.rank, self.device = cfg, seed, rank, torch.device(device)
        self.batches = int((state or {}).get("batches", 0))
        self.generator = torch.Generator(device=self.device)

    @property
    def epoch(self) -> int:
        return self.batches // SYNTHETIC_EPOCH

    def next(self) -> dict:
        size, batch = self.cfg.image_size, self.cfg.batch_size
        image = torch.empty((batch, 3, size, size), dtype=torch.uint8, device=self.device)
        for i in range(batch):
            self.generator.manual_seed(self.seed * 1_000_003 + self.batches * 65_537 + self.rank * batch + i)
            image[i].random_(0, 256, generator=self.generator)
        self.batches += 1
        return {"image": image, "skipped_corrupt": 0}

    def state(self) -> dict:
        return {"loader": "synthetic", "batches": self.batches}

    def unused_per_epoch(self) -> int:
        return 0


def choose_loader(cfg: DataConfig, device: torch.device) -> tuple[str, str]:
    """(loader, why) for `cfg.loader` on `device`."""
    if cfg.loader != "auto":
        return cfg.loader, f"data.loader={cfg.loader}"
    if device.type != "cuda":
        return "wds", "auto: no CUDA device (DALI decodes on the GPU)"
    from dtengine.data.dali import dali_unavailable_reason

    reason = dali_unavailable_reason()
    return ("wds", f"auto: {reason}") if reason else ("dali", "auto: CUDA and nvidia-dali")


def open_batches(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", state: dict | None = None):  # fmt: skip
    """The run's batches and a one-line description of the loader and why it was chosen.

    Raises:
        CheckpointError: `state` was written by another loader (the stream could not continue exactly).
    """
    device = torch.device(device)
    loader, why = choose_loader(cfg, device)
    if state and state.get("loader", "wds") != loader:
        raise CheckpointError(
            f"the checkpoint's data position belongs to the {state.get('loader')} loader, but this run uses {loader} "
            f"({why}); resume with data.loader={state.get('loader')}"
        )
    state = state or {}
    if loader == "synthetic":
        return SyntheticBatches(cfg, seed, rank, device, state), f"synthetic ({why})"
    if loader == "dali":
        from dtengine.data.dali import DaliBatches

        return DaliBatches(cfg, seed, rank, world_size, device, state), f"dali ({why})"
    stream = ShardStream(cfg, seed, rank, world_size)
    cursor = BatchCursor(stream, int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0)))
    return cursor, f"wds ({why})"

"""Labelled splits held in memory: every eval model sees the same images, in the same order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dtengine.data.decode import CorruptSample, decode_sample
from dtengine.data.loader import resolve_shards
from dtengine.data.pipeline import read_shards
from dtengine.errors import DataError


@dataclass
class LabelledSplit:
    """A whole split in memory (the built-in train split is 25 MB at 64 px)."""

    images: Tensor
    """uint8 (N, 3, S, S)."""
    seg: Tensor
    """int64 (N, S, S), label ids."""
    cls: Tensor
    """int64 (N,), per-image class ids."""
    skipped_corrupt: int = 0
    """Undecodable samples left out."""

    def __len__(self) -> int:
        return self.images.shape[0]

    def head(self, n: int) -> LabelledSplit:
        """The first `n` samples (all of them if n is 0 or larger than the split)."""
        n = len(self) if n <= 0 else min(n, len(self))
        return LabelledSplit(self.images[:n], self.seg[:n], self.cls[:n], self.skipped_corrupt)


def load_labelled_split(
    pattern: str, image_size: int, num_classes: int, builtin_root: str = "", limit: int = 0, progress: bool = True
) -> LabelledSplit:
    """Decode every sample of `pattern`'s shards, in shard order then tar order (no shuffling, no dropping).

    Args:
        pattern: shard pattern or "builtin:train" / "builtin:val" (see `dtengine.data.resolve_shards`).
        image_size: output side S.
        num_classes: label ids must lie in [0, num_classes).
        builtin_root: cache folder of the built-in dataset ("" = default).
        limit: stop after this many samples (0 = all).
        progress: show a progress bar.

    Returns:
        The split; corrupt samples are skipped and counted.

    Raises:
        DataError: no shard matches, a shard is unreadable, a sample lacks "seg.png" or "cls", a label id is out of
            range, or no sample decodes.
    """
    shards = resolve_shards(pattern, builtin_root, image_size)
    images, segs, classes, corrupt = [], [], [], 0
    bar = tqdm(desc=f"loading {pattern}", unit="img", disable=not progress, leave=False)
    for sample in read_shards(iter([{"url": url} for url in shards])):
        try:
            decoded = decode_sample(sample, image_size)
        except CorruptSample:
            corrupt += 1
            continue
        if "seg" not in decoded or "cls" not in decoded:
            missing = "seg.png" if "seg" not in decoded else "cls"
            raise DataError(
                f"sample '{sample['__key__']}' in shard '{sample['__url__']}' has no '{missing}' label; eval needs "
                "labelled shards (each sample with seg.png and cls), e.g. data.train_shards=builtin:train"
            )
        images.append(decoded["image"])
        segs.append(decoded["seg"].astype(np.int64))
        classes.append(decoded["cls"])
        bar.update(1)
        if limit and len(images) >= limit:
            break
    bar.close()
    if not images:
        raise DataError(f"no decodable sample in '{pattern}'; check the shards")
    split = LabelledSplit(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        seg=torch.from_numpy(np.stack(segs)),
        cls=torch.tensor(classes, dtype=torch.int64),
        skipped_corrupt=corrupt,
    )
    top = max(split.seg.max().item(), split.cls.max().item())
    if top >= num_classes or min(split.seg.min().item(), split.cls.min().item()) < 0:
        raise DataError(
            f"'{pattern}' holds label id {top}, outside [0, {num_classes}); set data.num_classes to the number of "
            "classes"
        )
    return split

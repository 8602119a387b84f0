"""Labelled splits held in memory: decoded once, in shard order, so every model and every repeat sees the same
images in the same order (evaluation, the interpreter, the supervised control)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dtengine.data.decode import CorruptSample, Crop, decode_sample
from dtengine.data.pipeline import read_shards
from dtengine.data.shard_stream import resolve_shards
from dtengine.runtime.errors import DataError

LABEL_FILES = {"seg": "seg.png", "cls": "cls"}
"""Label kind -> the sample entry it is read from."""


@dataclass
class LabelledSplit:
    """A whole split in memory (the built-in train split is 25 MB at 64 px)."""

    images: Tensor
    """uint8 (N, 3, S, S)."""
    seg: Tensor
    """int64 (N, S, S), label ids."""
    cls: Tensor | None = None
    """int64 (N,), per-image class ids (None when not asked for)."""
    skipped_corrupt: int = 0
    """Undecodable samples left out."""

    def __len__(self) -> int:
        return self.images.shape[0]

    def head(self, n: int) -> LabelledSplit:
        """The first `n` samples (all of them if n is 0 or larger than the split)."""
        n = len(self) if n <= 0 else min(n, len(self))
        cls = None if self.cls is None else self.cls[:n]
        return LabelledSplit(self.images[:n], self.seg[:n], cls, self.skipped_corrupt)


def load_labelled_split(
    pattern: str,
    image_size: int,
    *,
    builtin_root: str = "",
    limit: int = 0,
    labels: tuple[str, ...] = ("seg", "cls"),
    skip_unlabelled: bool = False,
    num_classes: int = 0,
    progress: bool = False,
) -> LabelledSplit:
    """Decode the samples of `pattern`'s shards, in shard order then tar order (no shuffling, no dropping).

    Args:
        pattern: shard pattern or "builtin:train" / "builtin:val" (see `dtengine.data.resolve_shards`).
        image_size: output side S.
        builtin_root: cache folder of the built-in dataset ("" = default).
        limit: stop after this many labelled samples (0 = all).
        labels: the labels every kept sample must have: "seg" (seg.png) and / or "cls".
        skip_unlabelled: pass over samples that lack them (else a sample without them is an error).
        num_classes: when > 0, every label id must lie in [0, num_classes).
        progress: show a progress bar.

    Returns:
        The split; corrupt samples are skipped and counted.

    Raises:
        DataError: no shard matches, a shard is unreadable, a sample lacks a label (unless skipped), no labelled
            sample decodes, or a label id is out of range.
    """
    shards = resolve_shards(pattern, builtin_root, image_size)
    images, segs, classes, corrupt, unlabelled = [], [], [], 0, 0
    bar = tqdm(desc=f"loading {pattern}", unit="img", disable=not progress, leave=False)
    for sample in read_shards(iter([{"url": url} for url in shards])):
        try:
            decoded = decode_sample(sample, Crop(image_size))
        except CorruptSample:
            corrupt += 1
            continue
        missing = [LABEL_FILES[kind] for kind in labels if kind not in decoded]
        if missing and skip_unlabelled:
            unlabelled += 1
            continue
        if missing:
            raise DataError(
                f"sample '{sample['__key__']}' in shard '{sample['__url__']}' has no '{missing[0]}' label; this needs "
                f"labelled shards (each sample with {' and '.join(LABEL_FILES[k] for k in labels)}), e.g. builtin:train"
            )
        images.append(decoded["image"])
        segs.append(decoded["seg"].astype(np.int64))
        classes.append(decoded.get("cls", -1))
        bar.update(1)
        if limit and len(images) >= limit:
            break
    bar.close()
    if not images and unlabelled:
        raise DataError(
            f"shards '{pattern}' hold no '{LABEL_FILES['seg']}' label maps ({unlabelled} unlabelled samples); "
            "this needs shards with per-pixel labels"
        )
    if not images:
        raise DataError(f"no decodable sample in '{pattern}'; check the shards")
    split = LabelledSplit(
        images=torch.stack(images).contiguous(),  # (N, 3, S, S), not channels-last
        seg=torch.from_numpy(np.stack(segs)),
        cls=torch.tensor(classes, dtype=torch.int64) if "cls" in labels else None,
        skipped_corrupt=corrupt,
    )
    if num_classes:
        ids = [split.seg] + ([split.cls] if split.cls is not None else [])
        top, bottom = max(int(x.max()) for x in ids), min(int(x.min()) for x in ids)
        if top >= num_classes or bottom < 0:
            raise DataError(
                f"'{pattern}' holds label id {top if top >= num_classes else bottom}, outside [0, {num_classes}); "
                "set data.num_classes to the number of classes"
            )
    return split

"""`dtengine check-shards`: read every sample of a set of shards, report the broken ones, and with `fix` rewrite
each shard that holds any without them (atomically, with a fresh DALI index). The wds loader can skip broken
samples; DALI cannot, so this is how shards are made fit for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dtengine.data.decode import CorruptSample, load_sample
from dtengine.data.pipeline import read_shards
from dtengine.data.shard_stream import resolve_shards
from dtengine.data.shards import write_tar
from dtengine.runtime.errors import DataError

CHECK_SIZE = 64  # decode size: JPEGs decode at reduced scale but still read every byte, so damage is found


@dataclass
class ShardCheck:
    shard: Path
    samples: int = 0
    broken: list[tuple[str, str]] = field(default_factory=list)
    """(key, why) of every sample that does not decode."""
    unreadable: str = ""
    """Why the shard itself cannot be read ("" when it can)."""
    fixed: bool = False


def check_shards(pattern: str, fix: bool = False, progress: bool = True) -> list[ShardCheck]:
    """Check (and with `fix`, repair) every shard `pattern` names; see the module docstring.

    A shard that cannot be read at all (truncated, not a tar) is reported, never rewritten: nothing in it can be
    trusted to be whole.
    """
    checks = []
    for shard in tqdm(resolve_shards(pattern), desc="check-shards", unit="shard", disable=not progress):
        check, good = ShardCheck(Path(shard)), []
        try:
            for sample in read_shards([{"url": shard}]):
                check.samples += 1
                try:
                    load_sample(sample, CHECK_SIZE)
                    good.append(sample)
                except CorruptSample as bad:
                    check.broken.append((sample["__key__"], f"{bad.what}: {bad.detail}"))
        except DataError as err:
            check.unreadable = str(err)
        if check.samples == 0 and not check.unreadable:
            check.unreadable = "holds no samples (a tar with no files in it); remove it or re-create it"
        if fix and check.broken and not check.unreadable:
            if not good:
                raise DataError(f"every sample of shard '{shard}' is broken; delete the shard instead")
            write_tar(shard, good)
            check.fixed = True
        checks.append(check)
    return checks

"""The built-in shapes dataset: procedural images with dense labels, generated once and cached as shards.

Lets every command run with no data to download (`data.shards=builtin`). The dataset folder is named after
every parameter that changes its contents, and is created under a temp name and renamed into place when complete,
so a folder with the final name is always a whole dataset; a second call just reuses it.
"""

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dtengine.data.shards import write_shards
from dtengine.data.synthetic import SHAPE_CLASSES, render_sample
from dtengine.runtime.errors import DataError
from dtengine.runtime.io import atomic_folder, cache_dir

_VERSION = "v1"  # bump when the generator changes, so old caches are not mistaken for the new dataset
_SPLITS = {"train": 0, "val": 1}  # split name -> stream id mixed into the seed, so splits never share samples
_JPEG_QUALITY = 95


@dataclass
class BuiltinDataset:
    """Where the built-in dataset lives."""

    root: Path
    """Folder holding `train-*.tar`, `val-*.tar` (each with an .idx) and `dataset.json`."""
    train_pattern: str
    """Brace pattern of the training shards, e.g. `/cache/.../train-{000000..000007}.tar`."""
    val_pattern: str
    """Brace pattern of the validation shards."""
    classes: tuple[str, ...]
    """Class names; index = label id in "seg.png" and "cls"."""


def _encode(image: np.ndarray, seg: np.ndarray, cls: int, key: str) -> dict:
    """One WebDataset sample: JPEG image, lossless PNG label map, ASCII class id."""
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=_JPEG_QUALITY)
    Image.fromarray(seg).save(png, format="PNG")
    return {"__key__": key, "jpg": jpg.getvalue(), "seg.png": png.getvalue(), "cls": str(cls).encode("ascii")}


def _split_samples(split: str, count: int, image_size: int, seed: int, progress: tqdm) -> Iterator[dict]:
    """The samples of one split; sample i depends only on (seed, split, i), not on generation order."""
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        yield _encode(*render_sample(rng, image_size), key=f"{split}{index:07d}")
        progress.update(1)


def _pattern(root: Path, split: str, num_shards: int) -> str:
    return str(root / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


def builtin_dataset(
    root: str | Path | None = None,
    *,
    image_size: int = 64,
    num_train: int = 2048,
    num_val: int = 256,
    samples_per_shard: int = 256,
    seed: int = 0,
) -> BuiltinDataset:
    """The built-in shapes dataset, generated on first use (with a progress bar) and cached.

    Each sample holds "jpg" (JPEG quality 95), "seg.png" (uint8 label map, ids into `SHAPE_CLASSES`) and "cls"
    (ASCII id of the shape with the most visible pixels). The same arguments always give byte-identical shards.

    Args:
        root: Cache folder in which the dataset folder
            `builtin-shapes-v1-{image_size}px-{num_train}-{num_val}-seed{seed}` is created; None means
            `$DTENGINE_CACHE` (default `~/.cache/dtengine`). Parameters are in the folder name, so datasets of
            different sizes never overwrite or impersonate each other.
        image_size: Side length of the square images.
        num_train: Number of training samples.
        num_val: Number of validation samples.
        samples_per_shard: Maximum samples per shard file; only used when generating (a cached dataset keeps
            its sharding, which `dataset.json` records).
        seed: Base seed; train and val derive different streams from it.

    Returns:
        The dataset's folder, shard patterns and class names.
    """
    for name, value in (("image_size", image_size), ("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"builtin dataset {name} must be a positive integer, got {value!r}")
    if image_size < 8:
        raise DataError(f"builtin dataset image_size must be at least 8, got {image_size}")
    cache = cache_dir() if root is None else Path(root).expanduser()
    name = f"builtin-shapes-{_VERSION}-{image_size}px-{num_train}-{num_val}-seed{seed}"
    target = cache / name
    counts = {"train": num_train, "val": num_val}
    if not target.exists():
        _generate(target, counts, image_size, samples_per_shard, seed)
    info_path = target / "dataset.json"
    if not info_path.is_file():
        raise DataError(f"'{target}' exists but is not a complete built-in dataset; delete it to regenerate")
    info = json.loads(info_path.read_text())
    return BuiltinDataset(
        root=target,
        train_pattern=_pattern(target, "train", info["shards"]["train"]),
        val_pattern=_pattern(target, "val", info["shards"]["val"]),
        classes=tuple(info["classes"]),
    )


def _generate(target: Path, counts: dict[str, int], image_size: int, samples_per_shard: int, seed: int) -> None:
    """Write the dataset into a temp folder beside `target`, then rename it into place in one step."""
    try:
        with atomic_folder(target) as tmp:
            shards = {}
            with tqdm(total=sum(counts.values()), desc=f"generating {target.name}", unit="img") as progress:
                for split, count in counts.items():
                    samples = _split_samples(split, count, image_size, seed, progress)
                    shards[split] = len(write_shards(samples, tmp, split, samples_per_shard))
            info = {"classes": list(SHAPE_CLASSES), "image_size": image_size, "seed": seed, "samples": counts}
            (tmp / "dataset.json").write_text(json.dumps({**info, "shards": shards}, indent=2) + "\n")
    except FileExistsError:
        # Another process finished the same dataset first; theirs is identical, so use it.
        if not (target / "dataset.json").is_file():
            raise

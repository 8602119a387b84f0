"""Writing WebDataset tar shards, each with a DALI-compatible index, atomically; packing a folder of images.

A shard is an uncompressed tar of files named `<key>.<ext>` (e.g. `000123.jpg`, `000123.seg.png`, `000123.cls`);
the files of one sample are adjacent. Next to every `name.tar` we write `name.idx` in the format of DALI's `wds2idx`
tool, so `nvidia.dali.fn.readers.webdataset` can read the shards without a separate indexing pass.

Both files are written to a temporary name and `os.replace`d into place, so an interrupted run never leaves a
partial shard under its final name (at worst a `.tar` whose `.idx` is missing, which `write_wds_index` can redo).
"""

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dtengine.data.decode import image_error, rgb_image, upright
from dtengine.runtime.errors import DataError
from dtengine.runtime.io import atomic_open

_INDEX_VERSION = "v1.2"  # the only version DALI's wds2idx writes
_FIXED_MTIME = 0  # an int (not time.time()) keeps shards byte-reproducible and avoids a pax header per file


def _split_name(name: str) -> tuple[str, str]:
    """Sample key and extension of a tar member, split at the first dot of the last path component.

    Mirrors `wds2idx.IndexCreator.split_name` exactly, including its quirk for names without a dot
    (key = name minus its last character, extension = whole name), so our index files match the tool's.
    """
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def check_tar_file(tar_path: str | Path) -> None:
    """Refuse, with a one-line `DataError` naming the shard, a file that is not a tar archive, or a tar cut short.

    tarfile reports a file that is no tar at all as "invalid header" or a stream ending early, and silently ends a
    stream at a truncated header; so look at the first block (a tar header, or the zero block of an empty tar)
    and at the size (tars are whole 512-byte blocks). A missing file is left to the caller's error.
    """
    tar_path = Path(tar_path)
    try:
        size = tar_path.stat().st_size
        with tar_path.open("rb") as stream:
            head = stream.read(512)
    except OSError:
        return
    if head != bytes(512):  # one zero block: an empty tar
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")  # checks length and header checksum
        except tarfile.HeaderError:
            what = "an empty file (0 bytes)" if size == 0 else "it does not start with a tar header"
            raise DataError(
                f"shard '{tar_path}' is not a tar archive ({what}); re-create it with `dtengine make-shards` or "
                "remove it"
            ) from None
    if size % 512:
        raise DataError(f"shard '{tar_path}' is truncated (size not a multiple of 512 bytes); re-create it or drop it")


def index_text(tar_path: str | Path) -> str:
    """The DALI webdataset index of an uncompressed tar, as `write_wds_index` writes it."""
    tar_path = Path(tar_path)
    samples: list[list[str]] = []
    last_key = None
    check_tar_file(tar_path)
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, ext = _split_name(member.name)
                if not key or key.endswith("/"):
                    continue
                if key != last_key:
                    samples.append([])
                    last_key = key
                samples[-1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot index shard '{tar_path}' ({err}); re-create the shard") from err
    if not samples:
        raise DataError(f"shard '{tar_path}' holds no samples (a tar with no files in it); remove it or re-create it")
    return f"{_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(files) + "\n" for files in samples)


def ensure_index(tar_path: str | Path) -> int:
    """Make sure the shard's `.idx` exists and is not older than the tar (else write it); return its sample count.

    A shard on read-only storage is indexed in memory instead (DALI then needs the index written elsewhere).
    """
    tar_path = Path(tar_path)
    idx_path = tar_path.with_suffix(".idx")
    try:
        if idx_path.is_file() and idx_path.stat().st_mtime >= tar_path.stat().st_mtime:
            header = idx_path.open().readline().split()
            if len(header) == 2 and header[0] == _INDEX_VERSION and header[1].isdigit():
                return int(header[1])
    except OSError:
        pass
    text = index_text(tar_path)
    try:
        with atomic_open(idx_path) as stream:
            stream.write(text.encode())
    except OSError:
        pass
    return int(text.split("\n", 1)[0].split()[1])


def write_wds_index(tar_path: str | Path, idx_path: str | Path) -> None:
    """Write the DALI webdataset index of an uncompressed tar, byte-identical to what `wds2idx` writes.

    Format: a header line `v1.2 <num_samples>`, then one line per sample listing, for each of its files in tar
    order, `<ext> <data_offset> <size> <member_name>`, space separated. Offsets are in bytes, of the file data
    (after the member's header blocks, pax headers included). Files of one sample must be adjacent in the tar;
    only regular files count, and names whose key is empty (hidden files such as `.foo`) are left out, as the
    tool does. (The tool reads names from GNU tar, which escapes unusual characters; we write them verbatim,
    which is the same for the plain ASCII keys our writers produce.)

    Args:
        tar_path: The shard to index.
        idx_path: Where to write the index (replaced atomically).

    Raises:
        DataError: the tar cannot be read or holds no files.
    """
    with atomic_open(Path(idx_path)) as stream:
        stream.write(index_text(tar_path).encode())


def _check_sample(sample: dict) -> None:
    """Reject samples that would make an unreadable shard (programming errors, hence ValueError)."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"sample '__key__' must be a non-empty string without dots, got {key!r}")
    for ext, value in sample.items():
        if not ext.startswith("_") and not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key!r}: value of {ext!r} must be bytes, got {type(value).__name__}")


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str, samples_per_shard: int) -> list[Path]:
    """Write samples into numbered WebDataset shards `{prefix}-000000.tar`, ... with an `.idx` beside each.

    Samples are consumed lazily, so a generator over a large folder never has to fit in memory.

    Args:
        samples: Dicts with a "__key__" (no dots) and bytes values keyed by extension ("jpg", "seg.png", "cls").
        out_dir: Directory for the shards; created if missing.
        prefix: File name prefix of the shards.
        samples_per_shard: Maximum number of samples per shard.

    Returns:
        Paths of the written .tar files, in order (empty if `samples` was empty).
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard <= 0:
        raise DataError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    iterator = iter(samples)
    while (first := next(iterator, None)) is not None:
        tar_path = out_dir / f"{prefix}-{len(shards):06d}.tar"
        write_tar(tar_path, itertools.chain([first], itertools.islice(iterator, samples_per_shard - 1)))
        shards.append(tar_path)
    return shards


def write_tar(tar_path: str | Path, samples: Iterable[dict]) -> Path:
    """Write one shard of `samples` (keys starting with "_" other than "__key__" are left out) atomically, and
    its `.idx` beside it. Returns the path."""
    tar_path = Path(tar_path)
    with atomic_open(tar_path) as stream, wds.TarWriter(stream, encoder=False, mtime=_FIXED_MTIME) as writer:
        for sample in samples:
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("_")}
            _check_sample(sample)
            writer.write(sample)
    write_wds_index(tar_path, tar_path.with_suffix(".idx"))
    return tar_path


PARALLEL_MIN_IMAGES = 256
"""Images per worker process below which make-shards stays in one process (starting workers costs more)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
"""File suffixes (compared case-insensitively) that `make_shards_from_folder` picks up."""

_JPEG_QUALITY = 95


@dataclass
class MakeShardsReport:
    """Outcome of `make_shards_from_folder`."""

    written: int
    """Number of images written into shards."""
    skipped: list[tuple[Path, str]]
    """(image path, reason) for every image that could not be decoded and was left out."""
    shards: list[Path]
    """The written .tar shards, in order (each has an .idx beside it)."""


def _find_images(src_dir: Path) -> list[Path]:
    """All image files under `src_dir`, recursively, sorted by relative path so shard contents are reproducible."""
    found = (p for p in src_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(found, key=lambda p: p.relative_to(src_dir).as_posix())


def _sample_key(relative: str, used: set[str]) -> str:
    """A unique WebDataset key for an image, readable from its relative path.

    WebDataset splits member names at the first dot and DALI's index tool at the first dot after the last slash,
    so keys keep only [A-Za-z0-9_-]; the suffix stays in the key so `a.jpg` and `a.png` do not collide. Long paths
    are shortened with a hash so names fit the 100-byte ustar limit (no pax headers).
    """
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", relative).strip("_") or "image"
    if len(key) > 80:
        key = f"{key[:63]}_{hashlib.sha1(relative.encode()).hexdigest()[:16]}"
    unique, n = key, 1
    while unique in used:
        n += 1
        unique = f"{key}_{n}"
    used.add(unique)
    return unique


def _jpeg_or_reason(path: Path) -> tuple[bytes | None, str]:
    """`_jpeg_bytes` for a worker process: (bytes, "") or (None, why it failed)."""
    try:
        return _jpeg_bytes(path), ""
    except (ValueError, OSError) as err:
        return None, str(err)


def _jpeg_bytes(path: Path) -> bytes:
    """The image at `path` as JPEG bytes: JPEG files as they are (the decoder turns CMYK into RGB and applies EXIF
    rotation when it reads them), anything else upright, in 8-bit RGB (see `rgb_image`), re-encoded at quality 95.

    Raises:
        ValueError: the file cannot be fully decoded; the message is the one-line reason.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode every pixel: `verify()` misses truncated data
            if image.format == "JPEG":
                return data
            rgb = rgb_image(upright(image))
    except Exception as err:  # PIL reports bad data as OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(image_error(err, data)) from err
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=_JPEG_QUALITY)
    return out.getvalue()


def make_shards_from_folder(
    src_dir: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000, prefix: str = "shard"
) -> MakeShardsReport:
    """Pack every image under a folder (recursively) into WebDataset shards of JPEGs, skipping unreadable ones.

    Writes `out_dir/{prefix}-000000.tar` (+ `.idx`), ... with one "jpg" per sample, and `out_dir/manifest.json`
    listing counts, skipped files with reasons, and shard names.

    Args:
        src_dir: Folder searched recursively for .jpg/.jpeg/.png/.webp files (any case), in sorted order.
        out_dir: Output folder; created if missing, and must not already hold `{prefix}-*.tar` shards.
        samples_per_shard: Maximum images per shard.
        prefix: Shard file name prefix.

    Returns:
        What was written and what was skipped.

    Raises:
        DataError: src_dir missing, no images in it, none of them decodable, out_dir a file or not creatable, or
            already holding shards.
    """
    src_dir, out_dir = Path(src_dir).expanduser(), Path(out_dir).expanduser()
    if not src_dir.is_dir():
        raise DataError(f"source folder '{src_dir}' does not exist or is not a folder; check --from-folder")
    images = _find_images(src_dir)
    if not images:
        raise DataError(f"no {'/'.join(IMAGE_SUFFIXES)} images found under '{src_dir}'; check --from-folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output folder '{out_dir}' is a file, not a folder; choose another --out (a folder)")
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise DataError(f"'{out_dir}' already holds {prefix}-*.tar shards; choose an empty --out folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a parent folder should be, no permission, ...
        why = err.strerror or err
        raise DataError(f"cannot create output folder '{out_dir}' ({why}); choose another --out") from err
    skipped: list[tuple[Path, str]] = []
    used_keys: set[str] = set()

    def samples(encoded: Iterator[tuple[bytes | None, str]]) -> Iterator[dict]:
        for path, (jpeg, reason) in zip(tqdm(images, desc=f"make-shards {src_dir.name}", unit="img"), encoded):
            if jpeg is None:
                skipped.append((path, reason))
                continue
            yield {"__key__": _sample_key(path.relative_to(src_dir).as_posix(), used_keys), "jpg": jpeg}

    # Decoding and re-encoding use every core; imap keeps the input order, so the shards do not depend on it.
    workers = min(os.cpu_count() or 1, max(1, len(images) // PARALLEL_MIN_IMAGES))
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            shards = write_shards(samples(pool.imap(_jpeg_or_reason, images, chunksize=64)), out_dir, prefix,
                                  samples_per_shard)  # fmt: skip
    else:
        shards = write_shards(samples(map(_jpeg_or_reason, images)), out_dir, prefix, samples_per_shard)
    report = MakeShardsReport(written=len(images) - len(skipped), skipped=skipped, shards=shards)
    manifest = out_dir / "manifest.json"
    _write_manifest(manifest, src_dir, report, samples_per_shard)
    if report.written == 0:
        raise DataError(f"none of the {len(images)} images under '{src_dir}' could be decoded; see '{manifest}'")
    return report


def _write_manifest(path: Path, src_dir: Path, report: MakeShardsReport, samples_per_shard: int) -> None:
    """Record what `make_shards_from_folder` did, for people and for later checks."""
    manifest = {
        "source": str(src_dir.resolve()),
        "written": report.written,
        "skipped": [{"path": p.relative_to(src_dir).as_posix(), "reason": r} for p, r in report.skipped],
        "samples_per_shard": samples_per_shard,
        "shards": [p.name for p in report.shards],
    }
    with atomic_open(path) as stream:
        stream.write((json.dumps(manifest, indent=2) + "\n").encode())

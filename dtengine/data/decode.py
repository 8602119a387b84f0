"""Raw WebDataset samples -> fixed-size arrays -> batch tensors.

An image is resized so its shorter side is `image_size`, then centre-cropped to a square; its label map (if any)
gets the same geometry with nearest-neighbour resampling so labels stay exact. Anything that fails to decode
raises `CorruptSample`, which the pipeline either counts and drops or turns into a `DataError`.
"""

import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Sample entries that may hold the image, in order of preference."""

_LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose pixel values are class ids


class CorruptSample(Exception):
    """A sample that cannot be decoded.

    Args:
        what: Which part is bad: "image", "label map" or "class label".
        detail: One line saying why.
    """

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what}: {detail}")
        self.what, self.detail = what, detail


@dataclass
class LoadedSample:
    """A sample with every entry decoded, before resizing."""

    image: Image.Image
    seg: Image.Image | None
    cls: int | None


def _one_line(err: Exception) -> str:
    """First line of an error message, without PIL's "<_io.BytesIO object at 0x...>" noise."""
    lines = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _open_rgb(data: bytes, image_size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # JPEG only (no-op otherwise): decode at the smallest 1/2^k scale that still covers image_size. Much faster
    # for large photos, and it still reads all the entropy-coded data, so truncation is still detected.
    image.draft("RGB", (image_size, image_size))
    return image.convert("RGB")  # convert() forces the full decode


def load_sample(sample: dict, image_size: int) -> LoadedSample:
    """Decode every entry of a raw sample (image, optional "seg.png", optional "cls"), without resizing.

    Args:
        sample: Raw WebDataset sample: "__key__", "__url__" and bytes per extension.
        image_size: Final size; lets JPEG decoding skip detail that the resize would throw away.

    Returns:
        The decoded entries.

    Raises:
        CorruptSample: an entry cannot be decoded, or the sample has no image.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise CorruptSample("image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry")
    try:
        image = _open_rgb(sample[ext], image_size)
    except Exception as err:  # PIL reports bad data as OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptSample("image", _one_line(err)) from err
    seg = None
    if "seg.png" in sample:
        try:
            seg = Image.open(io.BytesIO(sample["seg.png"]))
            seg.load()
        except Exception as err:  # same variety of PIL errors as above
            raise CorruptSample("label map", _one_line(err)) from err
        if seg.mode not in _LABEL_MODES:
            raise CorruptSample("label map", f"mode {seg.mode} is not a single-channel label image")
    cls = None
    if "cls" in sample:
        try:
            cls = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as err:
            raise CorruptSample("class label", _one_line(err)) from err
    return LoadedSample(image, seg, cls)


def decode_sample(sample: dict, image_size: int) -> dict:
    """Decode a raw sample and bring it to a square of side `image_size`.

    Args:
        sample: Raw WebDataset sample.
        image_size: Output side length S.

    Returns:
        "image": uint8 array (S, S, 3); "seg": label array (S, S), if the sample has "seg.png";
        "cls": int, if the sample has "cls".

    Raises:
        CorruptSample: see `load_sample`.
    """
    loaded = load_sample(sample, image_size)
    width, height = loaded.image.size
    scale = image_size / min(width, height)
    resized = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
    box = (left, top, left + image_size, top + image_size)
    out = {"image": np.asarray(loaded.image.resize(resized, Image.BICUBIC).crop(box))}
    if loaded.seg is not None:
        # Resized to the image's resized size (not scaled on its own) so the two crops line up exactly.
        out["seg"] = np.asarray(loaded.seg.resize(resized, Image.NEAREST).crop(box))
    if loaded.cls is not None:
        out["cls"] = loaded.cls
    return out


def collate(decoded: list[dict], skipped_corrupt: int) -> dict:
    """Stack decoded samples into a batch; "seg" / "cls" only when every sample has them.

    Args:
        decoded: Outputs of `decode_sample`, all of the same size S.
        skipped_corrupt: Corrupt samples dropped since the previous batch.

    Returns:
        "image": uint8 (B, 3, S, S); "seg": int64 (B, S, S); "cls": int64 (B,); "skipped_corrupt": int.
    """
    images = torch.from_numpy(np.stack([d["image"] for d in decoded]))  # (B, S, S, 3)
    batch = {"image": images.permute(0, 3, 1, 2).contiguous(), "skipped_corrupt": skipped_corrupt}
    if all("seg" in d for d in decoded):
        batch["seg"] = torch.from_numpy(np.stack([d["seg"] for d in decoded]).astype(np.int64))
    if all("cls" in d for d in decoded):
        batch["cls"] = torch.tensor([d["cls"] for d in decoded], dtype=torch.int64)
    return batch

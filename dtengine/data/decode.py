"""Raw WebDataset samples -> fixed-size arrays -> batch tensors.

A `Crop` says how an image becomes a square of `size`:

    center          resize so the shorter side is `size` (bicubic), then crop the centre (the paper's recipe)
    random_resized  a random box of `scale` x the area and aspect ratio in `ratio` (torchvision's
                    RandomResizedCrop algorithm), resized to `size` (bilinear) in one pass

JPEGs are decoded at the smallest 1/2^k scale that still covers the output (PIL `draft`). The label map (if any)
gets the same geometry with nearest-neighbour resampling so labels stay exact. Anything that fails to decode
raises `CorruptSample`, which the pipeline either counts and drops or turns into a `DataError`.
"""

import io
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Sample entries that may hold the image, in order of preference."""

_LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose pixel values are class ids
CROPS = ("center", "random_resized")


@dataclass(frozen=True)
class Crop:
    """How a sample becomes a square of side `size`; see the module docstring."""

    size: int
    kind: str = "center"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def random_resized_box(width: int, height: int, crop: Crop, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop box, as torchvision's RandomResizedCrop draws it.

    Ten tries at an area in `scale` x the image's and a log-uniform aspect ratio in `ratio`; if none fits, the
    largest centred box whose aspect ratio is clamped into `ratio`.
    """
    area = width * height
    log_ratio = (math.log(crop.ratio[0]), math.log(crop.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*crop.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < crop.ratio[0]:
        w, h = width, round(width / crop.ratio[0])
    elif aspect > crop.ratio[1]:
        w, h = round(height * crop.ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


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

    image: np.ndarray  # (H, W, 3) uint8, possibly decoded at a reduced scale
    full_size: tuple[int, int]  # (width, height) of the image at full scale
    seg: Image.Image | None
    cls: int | None


def _one_line(err: Exception) -> str:
    """First line of an error message, without PIL's "<_io.BytesIO object at 0x...>" noise."""
    lines = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _decode_rgb(data: bytes, draft_size) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels (H, W, 3) uint8, full (width, height)) of an encoded image.

    JPEGs are decoded at the smallest 1/2^k scale that still covers the size asked for (a callable gets the full
    size and returns it): much faster for large photos, and every byte of entropy-coded data is still read, so
    damage is still found. They go through libjpeg-turbo directly (simplejpeg): the same pixels as PIL's decoder
    (which uses the same library and settings) in about 55 % of its time, with no copy out of a PIL image. Other
    formats, and JPEGs it cannot take (CMYK, say), go through PIL.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            wanted_width, wanted_height = draft_size(width, height) if callable(draft_size) else draft_size
            # PIL's draft rule: the largest of 1/8, 1/4, 1/2, 1 that still covers the size (libjpeg-turbo would
            # also take other n/8 scales, which PIL never uses: keep the two decoders' pixels identical).
            reduce = max(
                (r for r in (8, 4, 2, 1) if r <= min(width // wanted_width, height // wanted_height)), default=1
            )
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=-(-width // reduce), min_height=-(-height // reduce)
            )
            return pixels, (width, height)
        except ValueError:
            pass  # PIL decodes what it can, and names what is broken
    image = Image.open(io.BytesIO(data))
    full = image.size
    image.draft("RGB", draft_size(*full) if callable(draft_size) else draft_size)
    image.load()
    return np.array(image if image.mode == "RGB" else image.convert("RGB")), full


def load_sample(sample: dict, image_size: int, draft_size=None) -> LoadedSample:
    """Decode every entry of a raw sample (image, optional "seg.png", optional "cls"), without resizing.

    Args:
        sample: Raw WebDataset sample: "__key__", "__url__" and bytes per extension.
        image_size: Final size; lets JPEG decoding skip detail that the resize would throw away.
        draft_size: (w, h) the decoded image must cover, or f(full_w, full_h) -> (w, h); default (S, S).

    Returns:
        The decoded entries.

    Raises:
        CorruptSample: an entry cannot be decoded, or the sample has no image.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise CorruptSample("image", f"no {'/'.join(IMAGE_EXTENSIONS)} entry")
    try:
        image, full_size = _decode_rgb(sample[ext], draft_size or (image_size, image_size))
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
    return LoadedSample(image, full_size, seg, cls)


def decode_sample(sample: dict, crop: Crop, rng: random.Random | None = None) -> dict:
    """Decode a raw sample and bring it to a square of side `crop.size` (see the module docstring).

    Args:
        sample: Raw WebDataset sample.
        crop: Output size and crop kind.
        rng: Source of the random box (random_resized only; default: seeded by the sample's key).

    Returns:
        "image": uint8 tensor (3, S, S) (possibly a strided view); "seg": label array (S, S), if the sample has
        "seg.png"; "cls": int, if the sample has "cls".

    Raises:
        CorruptSample: see `load_sample`.
    """
    size = crop.size
    if crop.kind == "random_resized":
        rng = rng or random.Random(sample.get("__key__", ""))
        boxes = {}

        def draft_size(width: int, height: int) -> tuple[int, int]:
            boxes["box"] = left, top, right, bottom = random_resized_box(width, height, crop, rng)
            # The decoded image may shrink until the box, shrunk alike, still spans `size` pixels.
            return math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top))

        loaded = load_sample(sample, size, draft_size)
        box = boxes["box"]
        shrink = loaded.image.shape[1] / loaded.full_size[0]
        left, top, right, bottom = (round(c * shrink) for c in box)
        window = torch.from_numpy(loaded.image[top:bottom, left:right]).permute(2, 0, 1)  # (3, h, w)
        # torch's antialiased uint8 resize is vectorised: about 3x faster than PIL's on these sizes.
        resized = F.interpolate(window[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = {"image": resized[0]}
        if loaded.seg is not None:
            out["seg"] = np.asarray(loaded.seg.resize((size, size), Image.NEAREST, box=box))
    else:
        loaded = load_sample(sample, size)
        # The geometry follows the full-size image, so a reduced-scale decode crops exactly the same region.
        width, height = loaded.full_size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        left, top = (resized[0] - size + 1) // 2, (resized[1] - size + 1) // 2  # half-way rounds up, as in DALI
        box = (left, top, left + size, top + size)
        picture = Image.fromarray(loaded.image).resize(resized, Image.BICUBIC).crop(box)
        out = {"image": torch.from_numpy(np.array(picture)).permute(2, 0, 1)}
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
    images = torch.empty((len(decoded), *decoded[0]["image"].shape), dtype=torch.uint8)  # (B, 3, S, S)
    for index, sample in enumerate(decoded):  # one copy per image, straight into the batch
        images[index].copy_(sample["image"])
    batch = {"image": images, "skipped_corrupt": skipped_corrupt}
    if all("seg" in d for d in decoded):
        batch["seg"] = torch.from_numpy(np.stack([d["seg"] for d in decoded]).astype(np.int64))
    if all("cls" in d for d in decoded):
        batch["cls"] = torch.tensor([d["cls"] for d in decoded], dtype=torch.int64)
    return batch

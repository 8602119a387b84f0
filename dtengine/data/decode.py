"""Raw WebDataset samples -> fixed-size arrays -> batch tensors.

A `Crop` says how an image becomes a square of `size`:

    center          resize so the shorter side is `size` (bicubic, antialiased), then crop the centre (the paper's
                    recipe)
    random_resized  a random box of `scale` x the area and aspect ratio in `ratio` (torchvision's
                    RandomResizedCrop algorithm), resized to `size` (bilinear) in one pass

JPEGs are decoded at the smallest 1/2^k scale that still covers the output (PIL `draft`). The label map (if any)
gets the same geometry with nearest-neighbour resampling so labels stay exact. Anything that fails to decode
raises `CorruptSample`, which the pipeline either counts and drops or turns into a `DataError`.

Every image becomes 8-bit RGB, upright (`rgb_image`, `_decode_rgb`):

    16-bit          ("I;16", "I;16B", "I", ...) scaled to 8 bits (value >> 8), never clipped at 255
    transparency    RGBA, LA, PA, palette or colour-keyed: composited on white
    CMYK / YCCK     JPEGs converted by PIL (which honours Adobe's inverted CMYK)
    EXIF rotation   orientation 2..8 applied (JPEG: read from the APP1 "Exif" segment, so the fast path stays)
    too large       more than PIL's limit (2 x `Image.MAX_IMAGE_PIXELS`): "image too large: W x H pixels"

Label maps are class ids and are never converted.
"""

import io
import math
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Sample entries that may hold the image, in order of preference."""

_LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose pixel values are class ids
CROPS = ("center", "random_resized")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (or 32-bit integer) single-channel modes
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_PIL_JPEG_COLORSPACES = ("CMYK", "YCCK")  # JPEGs for PIL, which knows whether Adobe's CMYK is inverted
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as `PIL.ImageOps.exif_transpose` does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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

    image: np.ndarray  # (H, W, 3) uint8, upright, possibly decoded at a reduced scale
    full_size: tuple[int, int]  # (width, height) of the upright image at full scale
    seg: Image.Image | None
    cls: int | None


def _one_line(err: Exception) -> str:
    """First line of an error message, without PIL's "<_io.BytesIO object at 0x...>" noise."""
    lines = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class ImageTooLarge(Exception):
    """An image over PIL's decompression-bomb limit; the message is the one-line reason."""

    def __init__(self, width: int, height: int):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        super().__init__(f"image too large: {width} x {height} pixels (the limit is {limit:,} pixels)")


def _check_pixels(width: int, height: int) -> None:
    """Refuse what PIL refuses: more than twice `Image.MAX_IMAGE_PIXELS` (None: no limit)."""
    if Image.MAX_IMAGE_PIXELS is not None and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise ImageTooLarge(width, height)


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an encoded image's header declares, read without PIL's size check; None if unknown."""
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            if accept is None or accept(prefix) is True:
                return factory(io.BytesIO(data), "").size
        except Exception:  # not this format, or a broken header: try the next
            continue
    return None


def image_error(err: Exception, data: bytes) -> str:
    """One readable line saying why `data` could not be decoded into an image (no traceback, no object ids)."""
    if isinstance(err, Image.DecompressionBombError):
        size = _declared_size(data)
        if size is not None:
            return str(ImageTooLarge(*size))
        return f"image too large: {_one_line(err)}"
    return _one_line(err)


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) of a JPEG, 1 without one: walks only the segments before the scan, and parses EXIF
    only when an APP1 "Exif" segment is there (most JPEGs have none, or orientation 1)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA) or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # EOI, SOS, standalone markers
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            try:
                with warnings.catch_warnings():  # PIL warns about broken EXIF, once per image: not worth a line
                    warnings.simplefilter("ignore")
                    exif = Image.Exif()
                    exif.load(data[pos + 4 : pos + 2 + length])
                    return _valid_orientation(exif.get(_ORIENTATION_TAG))
            except Exception:  # broken EXIF: the pixels are still fine, take them as they are
                return 1
        if length < 2:
            return 1
        pos += 2 + length
    return 1


def _valid_orientation(value) -> int:
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image (PNG: after `load()`, its EXIF may follow the pixels)."""
    try:
        with warnings.catch_warnings():  # PIL warns about broken EXIF, once per image: not worth a line
            warnings.simplefilter("ignore")
            return _valid_orientation(image.getexif().get(_ORIENTATION_TAG))
    except Exception:  # broken EXIF: the pixels are still fine, take them as they are
        return 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after applying `orientation` (5..8 swap them; the swap is its own inverse)."""
    return (size[1], size[0]) if orientation >= 5 else size


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, 3) pixels transposed as the EXIF `orientation` says (contiguous; unchanged for orientation 1)."""
    if orientation == 1:
        return pixels
    flipped = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }[orientation](pixels)
    return np.ascontiguousarray(flipped)


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a PIL image; see `_upright` for arrays)."""
    orientation = exif_orientation(image)
    return image.transpose(_UPRIGHT[orientation]) if orientation != 1 else image


def rgb_image(image: Image.Image) -> Image.Image:
    """8-bit RGB version of a decoded image: 16-bit values scaled (>> 8, not clipped), transparent areas (alpha,
    palette or colour-key transparency) composited on white, anything else (L, P, CMYK, ...) converted by PIL."""
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_rgb(data: bytes, draft_size) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels (H, W, 3) uint8, full (width, height)) of an encoded image, upright (EXIF orientation applied).

    JPEGs are decoded at the smallest 1/2^k scale that still covers the size asked for (a callable gets the full
    size and returns it): much faster for large photos, and every byte of entropy-coded data is still read, so
    damage is still found. They go through libjpeg-turbo directly (simplejpeg): the same pixels as PIL's decoder
    (which uses the same library and settings) in about 55 % of its time, with no copy out of a PIL image. Other
    formats, CMYK / YCCK JPEGs, and JPEGs it cannot take go through PIL. The size asked for, and the full size
    returned, are those of the upright image.

    Raises:
        ImageTooLarge: over PIL's pixel limit. Anything else PIL or simplejpeg raise for bad data.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # PIL decodes what it can, and names what is broken
        if colorspace is not None and colorspace not in _PIL_JPEG_COLORSPACES:
            _check_pixels(width, height)
            orientation = _jpeg_orientation(data)
            full = _oriented((width, height), orientation)
            wanted = draft_size(*full) if callable(draft_size) else draft_size
            wanted_width, wanted_height = _oriented(wanted, orientation)
            # PIL's draft rule: the largest of 1/8, 1/4, 1/2, 1 that still covers the size (libjpeg-turbo would
            # also take other n/8 scales, which PIL never uses: keep the two decoders' pixels identical).
            reduce = max(
                (r for r in (8, 4, 2, 1) if r <= min(width // wanted_width, height // wanted_height)), default=1
            )
            try:
                pixels = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_width=-(-width // reduce), min_height=-(-height // reduce)
                )
                return _upright(pixels, orientation), full
            except ValueError:
                draft_size = wanted  # PIL decodes what it can, and names what is broken (asked once: it may draw)
    image = Image.open(io.BytesIO(data))
    jpeg = image.format in ("JPEG", "MPO")  # MPO: a camera's JPEG with more pictures after the first
    if not jpeg:
        image.load()  # before reading EXIF: a PNG's may follow the pixels (JPEGs load after `draft`, below)
    orientation = _jpeg_orientation(data) if jpeg else exif_orientation(image)
    full = _oriented(image.size, orientation)
    wanted = draft_size(*full) if callable(draft_size) else draft_size
    if jpeg:
        image.draft("RGB", _oriented(wanted, orientation))
        image.load()
    plain = image.mode == "RGB" and "transparency" not in image.info
    return _upright(np.array(image if plain else rgb_image(image)), orientation), full


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
        raise CorruptSample("image", image_error(err, sample[ext])) from err
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


def center_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """A centre crop of a width x height image: the (w, h) the whole image is resized to (its shorter side to
    `size`) and the (left, top, right, bottom) box cut from that, half-way offsets rounded up, as in DALI."""
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (resized[0] - size + 1) // 2, (resized[1] - size + 1) // 2
    return resized, (left, top, left + size, top + size)


def center_label_map(seg: Image.Image, width: int, height: int, size: int) -> np.ndarray:
    """The centre crop (S, S) of the label map of a width x height image: resized nearest-neighbour to the image's
    resized size (not scaled on its own), so that the two crops line up exactly."""
    resized, box = center_geometry(width, height, size)
    return np.asarray(seg.resize(resized, Image.NEAREST).crop(box))


def image_batch(count: int, size: int) -> torch.Tensor:
    """An empty batch of `count` uint8 images (count, 3, size, size) over NHWC memory (channels_last): the layout
    the resizes below write fastest and the student reads on CUDA."""
    return torch.empty(count, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)


def _hwc_image(height: int, width: int) -> torch.Tensor:
    """An empty uint8 image (3, height, width) over HWC memory."""
    return torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)


# torch's antialiased uint8 resizes work in NHWC: into an NHWC destination they write directly, while F.interpolate
# (which has no `out=`) returns NCHW and transposes on the way. Resizing straight into a batch of `image_batch`
# takes 0.10 ms per random-resized crop to 224 px on a 2-core CPU, against 0.23 ms for F.interpolate plus the copy
# into the batch (benchmarks/bench_crop_resize.py). The ops are aten's own (private, hence the test that they stay
# F.interpolate's pixels bit for bit).
_RESIZE_INTO = {
    "bilinear": torch.ops.aten._upsample_bilinear2d_aa.out,
    "bicubic": torch.ops.aten._upsample_bicubic2d_aa.out,
}


def _resize_into(image: torch.Tensor, mode: str, out: torch.Tensor) -> torch.Tensor:
    """A (h, w, 3) uint8 image resized, antialiased, into `out` (3, H, W): F.interpolate's result, bit for bit."""
    _RESIZE_INTO[mode](image.permute(2, 0, 1)[None], list(out.shape[1:]), False, None, None, out=out[None])
    return out


def center_crop(image: torch.Tensor, size: int, full_size: tuple[int, int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """A (h, w, 3) uint8 image's centre crop, (3, size, size) uint8, written into `out` (by default a view of a new
    image over HWC memory): bicubic and antialiased, with torch's vectorised uint8 kernel (the cubic of PIL's and DALI's
    resizes, a = -0.5; 3x faster than PIL's).

    `full_size` (w, h): the image's size before a reduced-scale decode, whose geometry the crop follows, so that
    it cuts exactly the region a full-size decode would.
    """
    (width, height), (left, top, right, bottom) = center_geometry(*(full_size or image.shape[1::-1]), size)
    resized = _resize_into(image, "bicubic", _hwc_image(height, width))
    crop = resized[:, top:bottom, left:right]
    return crop if out is None else out.copy_(crop)


def resize_window(window: torch.Tensor, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """A (h, w, 3) uint8 crop window resized to (3, size, size) uint8, written into `out` (by default a new one
    over HWC memory), bilinear and antialiased. torch's uint8 kernel is vectorised: about 3x faster than PIL's and
    4x faster than DALI's CPU resize on these sizes, so the random-resized crops of both CPU loaders go through it."""
    return _resize_into(window, "bilinear", _hwc_image(size, size) if out is None else out)


def decode_sample(sample: dict, crop: Crop, rng: random.Random | None = None, out: torch.Tensor | None = None) -> dict:
    """Decode a raw sample and bring it to a square of side `crop.size` (see the module docstring).

    Args:
        sample: Raw WebDataset sample.
        crop: Output size and crop kind.
        rng: Source of the random box (random_resized only; default: seeded by the sample's key).
        out: Where to write the image, (3, S, S) uint8: a batch's slot, so that it is written once (fastest over
            HWC memory, as in `image_batch`).

    Returns:
        "image": uint8 tensor (3, S, S) (`out`, or possibly a strided view); "seg": label array (S, S), if the
        sample has "seg.png"; "cls": int, if the sample has "cls".

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
        decoded = {"image": resize_window(torch.from_numpy(loaded.image[top:bottom, left:right]), size, out)}
        if loaded.seg is not None:
            decoded["seg"] = np.asarray(loaded.seg.resize((size, size), Image.NEAREST, box=box))
    else:
        loaded = load_sample(sample, size)
        decoded = {"image": center_crop(torch.from_numpy(loaded.image), size, loaded.full_size, out)}
        if loaded.seg is not None:
            decoded["seg"] = center_label_map(loaded.seg, *loaded.full_size, size)
    if loaded.cls is not None:
        decoded["cls"] = loaded.cls
    return decoded


def collate(decoded: list[dict], skipped_corrupt: int, images: torch.Tensor) -> dict:
    """A batch of decoded samples; "seg" / "cls" only when every sample has them.

    Args:
        decoded: Outputs of `decode_sample`, all of the same size S, their images decoded into `images`.
        skipped_corrupt: Corrupt samples dropped since the previous batch.
        images: uint8 (B, 3, S, S) from `image_batch`, each slot written by `decode_sample`.

    Returns:
        "image": `images`; "seg": int64 (B, S, S); "cls": int64 (B,); "skipped_corrupt": int.
    """
    batch = {"image": images, "skipped_corrupt": skipped_corrupt}
    if all("seg" in d for d in decoded):
        batch["seg"] = torch.from_numpy(np.stack([d["seg"] for d in decoded]).astype(np.int64))
    if all("cls" in d for d in decoded):
        batch["cls"] = torch.tensor([d["cls"] for d in decoded], dtype=torch.int64)
    return batch

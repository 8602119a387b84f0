"""Every kind of image the engine may meet: converted to upright 8-bit RGB, or skipped with a one-line reason.

16-bit, transparent, palette, grey, CMYK / YCCK, EXIF-rotated, tiny and huge images through the decoder (wds
loader, eval, check-shards) and `make-shards`; the one-line errors for files that are no shards; and a fuzz of
random bytes through the wds and DALI loaders.
"""

from __future__ import annotations

import io
import random
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dtengine.data import DataConfig, ShardStream, make_shards_from_folder, write_shards
from dtengine.data import decode as decode_module
from dtengine.data.check import check_shards
from dtengine.data.decode import (
    CorruptSample,
    Crop,
    center_crop,
    center_geometry,
    decode_sample,
    image_batch,
    load_sample,
    resize_window,
    rgb_image,
)
from dtengine.data.loaders import open_batches
from dtengine.data.pipeline import read_shards
from dtengine.runtime.errors import ConfigError, DataError

BIG = 4096  # an image_size no test image reaches: JPEGs decode at full scale


# ------------------------------------------------------------------------------------------------ helpers -----
def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W, C) uint16 values, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."""
    height, width, channels = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def decoded(ext: str, data: bytes, size: int = BIG) -> np.ndarray:
    """(H, W, 3) uint8 pixels the loaders start from."""
    return load_sample({"__key__": "k", ext: data}, size).image


def quadrants(width: int = 60, height: int = 40) -> np.ndarray:
    """Red, green / blue, white quadrants: every flip and turn of it looks different."""
    picture = np.zeros((height, width, 3), np.uint8)
    picture[: height // 2, : width // 2] = (255, 0, 0)
    picture[: height // 2, width // 2 :] = (0, 255, 0)
    picture[height // 2 :, : width // 2] = (0, 0, 255)
    picture[height // 2 :, width // 2 :] = (255, 255, 255)
    return picture


def with_orientation(picture: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(Image.fromarray(picture), fmt, exif=exif, **options)


def one_shard(tmp_path: Path, samples: list[dict], name: str = "s") -> str:
    (shard,) = write_shards(samples, tmp_path / name, name, len(samples))
    return str(shard)


def finishes_within(seconds: float, work):
    """work()'s result, failing the test (instead of hanging it) if it takes longer than `seconds`."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def single_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and "<_io." not in message, message


# ------------------------------------------------------------------------------------- ordinary 8-bit RGB -----
def test_ordinary_rgb_images_decode_exactly_as_pil_does(monkeypatch):
    picture = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(picture), "JPEG", quality=90)
    np.testing.assert_array_equal(decoded("jpg", jpeg), np.asarray(Image.open(io.BytesIO(jpeg))))
    reduced = Image.open(io.BytesIO(jpeg))
    reduced.draft("RGB", (16, 16))  # the 1/2 scale the decoder takes for a 16 px output
    np.testing.assert_array_equal(decoded("jpg", jpeg, 16), np.asarray(reduced))
    np.testing.assert_array_equal(decoded("png", encode(Image.fromarray(picture), "PNG")), picture)

    # The common JPEG (no EXIF, RGB) never goes near PIL: libjpeg-turbo straight into an array.
    def refuse(*args, **kwargs):
        raise AssertionError("PIL was asked to open an ordinary JPEG")

    monkeypatch.setattr(decode_module.Image, "open", refuse)
    monkeypatch.setattr(decode_module.Image, "Exif", refuse)
    np.testing.assert_array_equal(decoded("jpg", jpeg), np.asarray(simplejpeg.decode_jpeg(jpeg)))


# ------------------------------------------------------------------------------------------------- 16-bit -----
def test_16_bit_png_is_scaled_to_8_bit_not_clipped():
    values = np.array([[0, 255, 256, 32896, 40000, 65535]], np.uint16)
    want = (values >> 8).astype(np.uint8)  # 0 0 1 128 156 255
    grey = decoded("png", encode(Image.fromarray(values), "PNG"))  # PIL writes (and reads) it as "I;16"
    np.testing.assert_array_equal(grey, np.repeat(want[..., None], 3, axis=2))
    colour = decoded("png", png16(np.stack([values, values[:, ::-1], values], axis=2)))  # opened as "RGB"
    np.testing.assert_array_equal(colour[..., 0], want)
    np.testing.assert_array_equal(colour[..., 1], want[:, ::-1])
    mid_grey = np.full((8, 8, 1), 32896, np.uint16)
    assert decoded("png", png16(mid_grey)).mean() == 128  # a 16-bit mid-grey is grey, not white


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)),  # I;16
        Image.frombytes("I;16B", (3, 1), np.array([0, 32896, 65535], ">u2").tobytes()),
        Image.fromarray(np.array([[-7, 32896, 70000]], np.int32)),  # I (out-of-range values clipped first)
    ],
    ids=["I;16", "I;16B", "I"],
)
def test_rgb_image_scales_every_16_bit_mode(image):
    assert np.asarray(rgb_image(image)).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_16_bit_png_with_alpha_is_composited_on_white():
    opaque_red = np.array([65535, 0, 0, 65535], np.uint16)
    clear_blue = np.array([0, 0, 65535, 0], np.uint16)
    pixels = decoded("png", png16(np.stack([np.stack([opaque_red, clear_blue])])))
    assert pixels.tolist() == [[[255, 0, 0], [255, 255, 255]]]


# ------------------------------------------------------------------------------------------- transparency -----
def _palette_image(transparency: bool, width: int = 6) -> Image.Image:
    image = Image.new("P", (width, 4), 0)
    image.putpalette([200, 30, 40, 10, 20, 250] + [0, 0, 0] * 254)
    image.paste(1, (width // 2, 0, width, 4))  # right half: palette entry 1
    if transparency:
        image.info["transparency"] = 1
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "left", "right"),
    [
        (Image.new("RGBA", (6, 4), (255, 0, 0, 0)), "PNG", (255, 255, 255), (255, 255, 255)),
        (Image.new("RGBA", (6, 4), (255, 0, 0, 128)), "PNG", (255, 127, 127), (255, 127, 127)),
        (Image.new("RGBA", (6, 4), (255, 0, 0, 128)), "WEBP", (255, 127, 127), (255, 127, 127)),
        (Image.new("LA", (6, 4), (0, 128)), "PNG", (127, 127, 127), (127, 127, 127)),
        (_palette_image(transparency=True), "PNG", (200, 30, 40), (255, 255, 255)),
        (_palette_image(transparency=False), "PNG", (200, 30, 40), (10, 20, 250)),
        (Image.new("L", (6, 4), 90), "PNG", (90, 90, 90), (90, 90, 90)),
        (Image.new("1", (6, 4), 1), "PNG", (255, 255, 255), (255, 255, 255)),
    ],
    ids=["RGBA-clear", "RGBA-half", "RGBA-webp", "LA", "P-transparent", "P", "L", "1"],
)
def test_transparent_palette_and_grey_images_become_rgb_on_white(image, fmt, left, right):
    options = {"lossless": True} if fmt == "WEBP" else {}
    if "transparency" in image.info:
        options["transparency"] = image.info["transparency"]
    pixels = decoded(fmt.lower(), encode(image, fmt, **options))
    assert pixels.shape == (4, 6, 3)
    assert np.abs(pixels[:, :3].astype(int) - left).max() <= 1 and np.abs(pixels[:, 3:].astype(int) - right).max() <= 1


def test_colour_keyed_and_pa_images_are_composited_on_white():
    keyed = Image.fromarray(quadrants(4, 2))  # red green / blue white, with red transparent (PNG tRNS)
    pixels = decoded("png", encode(keyed, "PNG", transparency=(255, 0, 0)))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 3].tolist() == [0, 255, 0]
    pa = Image.new("PA", (2, 1))
    pa.putpalette([255, 0, 0] * 256)
    pa.putpixel((1, 0), (0, 255))
    assert np.asarray(rgb_image(pa)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


# ----------------------------------------------------------------------------------------------- CMYK ---------
def _ycck_red() -> bytes:
    """A YCCK JPEG (libjpeg-turbo writes CMYK that way) of pure red; stored inverted, as Adobe's CMYK is."""
    inverted_red = np.full((16, 24, 4), [255, 0, 0, 255], np.uint8)  # C, M, Y, K = 0, 255, 255, 0
    data = simplejpeg.encode_jpeg(inverted_red, quality=95, colorspace="CMYK")
    assert simplejpeg.decode_jpeg_header(data)[2] == "YCCK"
    return data


@pytest.mark.parametrize("kind", ["CMYK", "YCCK"])
def test_cmyk_and_ycck_jpegs_decode_to_the_right_colours(kind):
    if kind == "CMYK":
        data = encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # PIL writes Adobe CMYK
    else:
        data = _ycck_red()
    for size in (BIG, 8):  # full scale, and reduced (PIL's draft)
        pixels = decoded("jpg", data, size).astype(int)
        assert np.abs(pixels - (255, 0, 0)).max() <= 3, kind
    crop = decode_sample({"__key__": "c", "jpg": data}, Crop(8, "random_resized"), random.Random(0))["image"]
    assert np.abs(crop.permute(1, 2, 0).numpy().astype(int) - (255, 0, 0)).max() <= 3


def test_cmyk_photo_matches_pil_conversion():
    cmyk = np.random.default_rng(1).integers(0, 256, (32, 40, 4), dtype=np.uint8)
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=90)
    np.testing.assert_array_equal(decoded("jpg", data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# ----------------------------------------------------------------------------------------------- EXIF ---------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_jpegs(orientation):
    data = with_orientation(quadrants(), orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    loaded = load_sample({"__key__": "k", "jpg": data}, BIG)
    np.testing.assert_array_equal(loaded.image, want)
    assert loaded.full_size == (want.shape[1], want.shape[0])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_pngs(orientation):
    data = with_orientation(quadrants(), orientation, "PNG")
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(decoded("png", data), want)


@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_rotated_jpeg_crops_like_the_upright_picture(crop):
    """A JPEG stored sideways with orientation 6 gives the crops of the upright picture (a lossless PNG of it),
    at reduced-scale decoding too: the crop box is drawn on the upright image."""
    upright = np.asarray(Image.fromarray(quadrants(200, 120)).resize((200, 120)))
    sideways = np.ascontiguousarray(np.rot90(upright, 1))  # stored turned left; orientation 6 turns it right
    spec = Crop(32, crop, scale=(0.3, 1.0))
    for seed in range(4):
        rotated = decode_sample({"__key__": "r", "jpg": with_orientation(sideways, 6)}, spec, random.Random(seed))
        plain = decode_sample(
            {"__key__": "p", "png": encode(Image.fromarray(upright), "PNG")}, spec, random.Random(seed)
        )
        assert (rotated["image"].float() - plain["image"].float()).abs().mean() < 6, (crop, seed)


def test_broken_exif_is_ignored():
    jpeg = encode(Image.fromarray(quadrants()), "JPEG", quality=95)
    broken = jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*garb" + jpeg[2:]  # an APP1 "Exif" of nonsense
    np.testing.assert_array_equal(decoded("jpg", broken), decoded("jpg", jpeg))


# ------------------------------------------------------------------------------------------------ tiny ---------
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (5, 3), (1, 40), (2, 2)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_tiny_images_are_resized_up_to_the_crop(size, fmt, crop):
    colour = (10, 200, 30)
    labels = encode(Image.new("L", size, 3), "PNG")
    sample = {"__key__": "t", fmt.lower(): encode(Image.new("RGB", size, colour), fmt), "seg.png": labels}
    out = decode_sample(sample, Crop(16, crop))
    assert out["image"].shape == (3, 16, 16) and out["seg"].shape == (16, 16)
    assert np.abs(out["image"].permute(1, 2, 0).numpy().astype(int) - colour).max() <= 4
    assert (out["seg"] == 3).all()


# ---------------------------------------------------------------------------------------- resize into ---------
@pytest.mark.parametrize("window", [(7, 9), (24, 24), (50, 31), (101, 77), (13, 200)])
def test_crops_resized_into_a_batch_are_f_interpolate_bit_for_bit(window):
    """The resizes write straight into a batch slot (torch's `out=` ops): the same pixels as F.interpolate, up or
    down, from a strided window; by default over HWC memory, like the batch."""
    height, width = window
    image = torch.randint(
        0, 256, (height + 5, width + 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    window = image[2 : 2 + height, 1 : 1 + width]  # a view into the decoded image, as the loaders crop it
    chw = window.permute(2, 0, 1)[None].contiguous()
    batch = image_batch(3, 24)
    assert batch.is_contiguous(memory_format=torch.channels_last)

    expected = F.interpolate(chw, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.equal(resize_window(window, 24, out=batch[1]), expected) and torch.equal(batch[1], expected)
    assert torch.equal(resize_window(window, 24), expected)
    assert resize_window(window, 24).permute(1, 2, 0).is_contiguous()

    (w, h), (left, top, right, bottom) = center_geometry(width, height, 24)
    resized = F.interpolate(chw, size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    expected = resized[:, top:bottom, left:right]
    assert torch.equal(center_crop(window, 24, out=batch[2]), expected) and torch.equal(batch[2], expected)
    assert torch.equal(center_crop(window, 24), expected)


# ------------------------------------------------------------------------------------------------ huge ---------
def huge_png(width: int = 20000, height: int = 10000) -> bytes:
    """A PNG header declaring width x height pixels (over PIL's limit), without the pixels."""
    small = png16(np.zeros((1, 1, 3), np.uint16))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return small[:8] + ihdr + small[8 + 25 :]


def huge_jpeg(width: int = 20000, height: int = 10000) -> bytes:
    """A small JPEG whose frame header claims width x height pixels."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(("ext", "data"), [("png", huge_png()), ("jpg", huge_jpeg())], ids=["png", "jpg"])
def test_huge_images_are_skipped_with_their_size(ext, data):
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(CorruptSample) as caught:
        load_sample({"__key__": "h", ext: data}, 64)
    assert caught.value.detail.startswith("image too large: 20000 x 10000 pixels")
    single_line(str(caught.value))
    assert limit == Image.MAX_IMAGE_PIXELS  # PIL's limit is kept, not lifted


def test_huge_images_are_skipped_and_counted_by_the_loader(tmp_path):
    good = encode(Image.new("RGB", (20, 20), (9, 9, 9)), "JPEG")
    samples = [{"__key__": f"g{i}", "jpg": good} for i in range(4)]
    samples[1:1] = [{"__key__": "hp", "png": huge_png()}, {"__key__": "hj", "jpg": huge_jpeg()}]
    shard = one_shard(tmp_path, samples)
    batches = list(ShardStream(DataConfig(shards=shard, image_size=16, batch_size=2, num_workers=0), seed=0).epoch(0))
    assert sum(b["skipped_corrupt"] for b in batches) >= 2 and all(b["image"].shape[0] == 2 for b in batches)
    (report,) = check_shards(shard, progress=False)
    assert [why for _, why in report.broken] == ["image: image too large: 20000 x 10000 pixels (the limit is "
                                                 f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels)"] * 2  # fmt: skip


# ------------------------------------------------------------------------------------------- label maps -----
def test_label_maps_keep_their_class_ids():
    ids = np.array([[0, 1], [2, 300]], np.uint16)  # "I;16": class ids, not 16-bit intensities
    image = encode(Image.new("RGB", (2, 2), (50, 50, 50)), "PNG")
    out = decode_sample({"__key__": "l", "png": image, "seg.png": encode(Image.fromarray(ids), "PNG")}, Crop(8))
    assert set(np.unique(out["seg"]).tolist()) == {0, 1, 2, 300}
    with pytest.raises(CorruptSample, match="label map: mode RGB is not a single-channel"):
        load_sample({"__key__": "l", "png": image, "seg.png": image}, 8)


# ------------------------------------------------------------------------------------------- make-shards -----
def _shard_images(report) -> dict[str, np.ndarray]:
    """key -> the decoded image of every sample make-shards wrote."""
    return {s["__key__"]: decoded("jpg", s["jpg"]) for s in read_shards({"url": str(p)} for p in report.shards)}


def test_make_shards_converts_every_kind(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "grey16.png").write_bytes(png16(np.full((10, 12, 1), 32896, np.uint16)))
    (src / "rgb16.png").write_bytes(png16(np.full((10, 12, 3), [65535, 32896, 0], np.uint16)))
    (src / "clear.png").write_bytes(encode(Image.new("RGBA", (12, 10), (0, 0, 0, 0)), "PNG"))
    (src / "palette.png").write_bytes(encode(_palette_image(True, width=32), "PNG", transparency=1))
    (src / "cmyk.jpg").write_bytes(encode(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), "JPEG", quality=95))
    (src / "ycck.jpg").write_bytes(_ycck_red())
    (src / "turned.jpg").write_bytes(with_orientation(quadrants(), 6))
    (src / "turned.png").write_bytes(with_orientation(quadrants(), 8, "PNG"))
    (src / "tiny.png").write_bytes(encode(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"))
    (src / "huge.png").write_bytes(huge_png())
    (src / "junk.png").write_bytes(b"not an image at all")
    report = make_shards_from_folder(src, tmp_path / "out", samples_per_shard=50)
    reasons = {path.name: why for path, why in report.skipped}
    assert reasons == {
        "huge.png": f"image too large: 20000 x 10000 pixels (the limit is {2 * Image.MAX_IMAGE_PIXELS:,} pixels)",
        "junk.png": "cannot identify image file",
    }
    images = _shard_images(report)
    assert abs(images["grey16_png"].mean() - 128) <= 1
    assert np.abs(images["rgb16_png"].astype(int) - (255, 128, 0)).max() <= 3
    assert images["clear_png"].min() >= 250  # transparent: white, not the black it hid
    assert np.abs(images["palette_png"][:, 24:].astype(int) - 255).max() <= 4  # away from JPEG's colour bleeding
    assert np.abs(images["palette_png"][:, :8].astype(int) - (200, 30, 40)).max() <= 4
    for name in ("cmyk_jpg", "ycck_jpg"):
        assert np.abs(images[name].astype(int) - (255, 0, 0)).max() <= 3, name
    # JPEGs are kept as they are (EXIF and all); the decoder turns them. PNGs are re-encoded upright.
    assert images["turned_jpg"].shape == (60, 40, 3) and images["turned_png"].shape == (60, 40, 3)
    assert np.abs(images["turned_jpg"][2, 2].astype(int) - (0, 0, 255)).max() <= 8  # blue quadrant turned right
    assert np.abs(images["turned_png"][2, 2].astype(int) - (0, 255, 0)).max() <= 8  # green quadrant turned left
    assert images["tiny_png"].shape == (1, 1, 3)


def test_make_shards_reasons_are_one_readable_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "text.png").write_text("hello")
    (src / "cut.jpg").write_bytes(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200])
    (src / "good.jpg").write_bytes(encode(Image.new("RGB", (8, 8)), "JPEG"))
    report = make_shards_from_folder(src, tmp_path / "out")
    assert len(report.skipped) == 3
    for _, why in report.skipped:
        single_line(why)
        assert why and "BytesIO" not in why


# ------------------------------------------------------------------------------------------ error messages -----
def test_make_shards_into_a_file_is_a_one_line_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    a_file = tmp_path / "taken"
    a_file.write_text("a file")
    with pytest.raises(DataError, match="is a file, not a folder") as caught:
        make_shards_from_folder(src, a_file)
    assert str(a_file) in str(caught.value) and "--out" in str(caught.value)
    with pytest.raises(DataError, match="cannot create output folder") as caught:
        make_shards_from_folder(src, a_file / "below")
    single_line(str(caught.value))
    assert a_file.read_text() == "a file"


@pytest.mark.parametrize("length", [100, 2048])  # not a multiple of 512 bytes, and a whole number of blocks
def test_a_text_file_named_tar_is_not_a_tar_archive(tmp_path, length):
    shard = tmp_path / "notes-000000.tar"
    shard.write_bytes((b"some notes, not a tar\n" * 200)[:length])
    for attempt in (
        lambda: ShardStream(DataConfig(shards=str(shard), num_workers=0), seed=0),
        lambda: list(read_shards([{"url": str(shard)}])),
    ):
        with pytest.raises(DataError, match="is not a tar archive") as caught:
            attempt()
        assert str(shard) in str(caught.value) and "truncated" not in str(caught.value)
        single_line(str(caught.value))
    (report,) = check_shards(str(shard), progress=False)
    assert "is not a tar archive" in report.unreadable


def test_a_cut_tar_is_still_called_truncated(tmp_path):
    shard = one_shard(tmp_path, [{"__key__": f"k{i}", "jpg": b"x" * 700} for i in range(4)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shard).read_bytes()[:1500])
    with pytest.raises(DataError, match="is truncated"):
        list(read_shards([{"url": str(cut)}]))


def test_an_empty_tar_is_a_one_line_error_naming_it(tmp_path):
    empty = tmp_path / "empty-000000.tar"
    with tarfile.open(empty, "w"):
        pass
    data = DataConfig(shards=str(empty), num_workers=0, batch_size=2)
    with pytest.raises(DataError, match="holds no samples") as caught:
        open_batches(data, seed=0)[0].next()
    assert str(empty) in str(caught.value)
    single_line(str(caught.value))
    # Indexed elsewhere as empty (DALI's wds2idx writes "v1.2 0"): the loader says so, not "lower batch_size".
    empty.with_suffix(".idx").write_text("v1.2 0\n")
    with pytest.raises(DataError, match="hold no samples; check them with `dtengine check-shards") as caught:
        open_batches(data, seed=0)[0].next()
    assert "batch_size" not in str(caught.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shards_of_only_corrupt_samples_say_so(tmp_path, num_workers):
    samples = [{"__key__": f"k{i}", "jpg": b"\xff\xd8\xff" + bytes([i]) * 50} for i in range(6)]
    shard = one_shard(tmp_path, samples)
    batches, _ = open_batches(DataConfig(shards=shard, num_workers=num_workers, batch_size=2), seed=0)
    with pytest.raises(DataError, match=r"hold no decodable samples \(all 6 are corrupt\)") as caught:
        finishes_within(60, batches.next)
    assert "dtengine check-shards" in str(caught.value) and "batch_size" not in str(caught.value)
    single_line(str(caught.value))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resampled_shards_of_only_corrupt_samples_stop_instead_of_skipping_forever(tmp_path, num_workers):
    samples = [{"__key__": f"k{i}", "jpg": b"\xff\xd8\xff" + bytes([i]) * 50} for i in range(6)]
    shard = one_shard(tmp_path, samples)
    data = DataConfig(shards=shard, num_workers=num_workers, batch_size=2, resample=True)
    batches, _ = open_batches(data, seed=0)
    with pytest.raises(DataError, match=r"6 samples in a row do not decode \(the last: 'k\d'") as caught:
        finishes_within(60, batches.next)
    assert "dtengine check-shards" in str(caught.value)
    single_line(str(caught.value))


def test_too_few_samples_for_a_batch_still_points_to_the_batch_size(tmp_path):
    good = encode(Image.new("RGB", (8, 8)), "JPEG")
    shard = one_shard(tmp_path, [{"__key__": f"k{i}", "jpg": good} for i in range(3)])
    batches, _ = open_batches(DataConfig(shards=shard, num_workers=0, batch_size=4), seed=0)
    with pytest.raises(ConfigError, match=r"3 samples.*lower data.batch_size"):
        batches.next()


# ------------------------------------------------------------------------------------------------- fuzz ---------
def fuzz_samples(count: int, seed: int) -> list[dict]:
    """`count` samples, most of them broken in every way we could think of, some good; the last one is good.

    Kinds: random bytes as "jpg" / "png", a PNG signature or a JPEG's headers followed by garbage, JPEGs cut
    anywhere, JPEGs with bytes flipped, JPEG headers claiming absurd sizes, good images with a garbage label map
    or class, and good JPEGs / PNGs (tiny, grey, 16-bit, transparent) in between.
    """
    rng = np.random.default_rng(seed)

    def photo() -> bytes:
        width, height = (int(v) for v in rng.integers(1, 48, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return encode(Image.fromarray(pixels), "JPEG", quality=int(rng.integers(30, 95)))

    samples = []
    for index in range(count - 1):
        kind, jpeg = index % 10, photo()
        scan = jpeg.find(b"\xff\xda")
        if kind == 0:
            sample = {"jpg": rng.bytes(int(rng.integers(0, 3000)))}
        elif kind == 1:
            sample = {"png": rng.bytes(int(rng.integers(0, 3000)))}
        elif kind == 2:
            sample = {"jpg": jpeg[: int(rng.integers(2, len(jpeg) - 16))]}
        elif kind == 3:
            sample = {"jpg": jpeg[: scan + int(rng.integers(0, 40))] + rng.bytes(int(rng.integers(0, 2000)))}
        elif kind == 4:
            sample = {"png": b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(0, 500)))}
        elif kind == 5:
            flipped = bytearray(jpeg)
            for at in rng.integers(2, len(jpeg), 8):
                flipped[at] = int(rng.integers(0, 256))
            sample = {"jpg": bytes(flipped)}
        elif kind == 6:
            sample = {"jpg": huge_jpeg(*(int(v) for v in rng.integers(1, 65536, 2)))}
        elif kind == 7:
            sample = {"jpg": jpeg, "seg.png" if index % 20 == 7 else "cls": rng.bytes(20)}
        elif kind == 8:
            sample = {"jpg": jpeg}
        else:
            picture = [
                Image.new("RGBA", (5, 3), (1, 2, 3, 4)),
                Image.fromarray(rng.integers(0, 65536, (4, 4), dtype=np.uint16)),
                Image.new("L", (1, 1)),
            ][index % 3]
            sample = {"png": encode(picture, "PNG")}
        samples.append({"__key__": f"f{index:04d}", **sample})
    return [*samples, {"__key__": "last", "jpg": photo()}]


def _is_corrupt(sample: dict) -> bool:
    try:
        load_sample(sample, 16)
    except CorruptSample:
        return True
    return False


@pytest.fixture(scope="module")
def fuzz_shard(tmp_path_factory) -> tuple[str, list[dict], list[bool]]:
    samples = fuzz_samples(400, seed=7)
    shard = one_shard(tmp_path_factory.mktemp("fuzz"), samples, "fuzz")
    return shard, samples, [_is_corrupt(s) for s in samples]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # headers claiming ~100 Mpx
def test_fuzz_samples_that_are_no_images_are_all_found(fuzz_shard):
    _, samples, corrupt = fuzz_shard
    for sample, bad in zip(samples[:-1], corrupt):
        kind = int(sample["__key__"][1:]) % 10
        if kind in (0, 1, 2, 4, 7):  # random bytes, cut JPEGs, a PNG signature and garbage, garbage labels
            assert bad, f"{sample['__key__']} decoded"
        if kind == 6:  # a header claiming a size: refused over PIL's limit (PIL fills a short scan with grey)
            height, width, _, _ = simplejpeg.decode_jpeg_header(sample["jpg"])
            if width * height > 2 * Image.MAX_IMAGE_PIXELS:
                with pytest.raises(CorruptSample, match=f"image too large: {width} x {height} pixels"):
                    load_sample(sample, 16)
    assert 250 < sum(corrupt) < 390


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # headers claiming ~100 Mpx
@pytest.mark.parametrize("num_workers", [0, 1])
def test_fuzz_through_the_wds_loader_skips_and_counts_every_bad_sample(fuzz_shard, num_workers):
    """Batches of 1 in shard order: the good samples come out one per batch, in order, and the corrupt samples
    before each are counted with it (the last sample is good, so one pass counts them all)."""
    shard, samples, corrupt = fuzz_shard
    data = DataConfig(shards=shard, image_size=16, batch_size=1, num_workers=num_workers, shuffle_buffer=0)
    good = [s for s, bad in zip(samples, corrupt) if not bad]

    def first_pass() -> list[dict]:
        epoch = ShardStream(data, seed=0).epoch(0)
        try:
            return [next(epoch) for _ in good]
        finally:
            epoch.close()

    batches = finishes_within(60, first_pass)
    assert sum(b["skipped_corrupt"] for b in batches) == sum(corrupt)
    for batch, sample in zip(batches, good):
        assert torch.equal(
            batch["image"][0], decode_sample(sample, Crop(16), random.Random(f"0-0-{sample['__key__']}"))["image"]
        )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # headers claiming ~100 Mpx
def test_fuzz_through_dali_stops_with_a_one_line_error(tmp_path):
    pytest.importorskip("nvidia.dali")
    from dtengine.data.dali import DaliBatches

    for seed in range(3):
        shard = one_shard(tmp_path, fuzz_samples(40, seed=100 + seed), f"dali{seed}")
        data = DataConfig(shards=shard, image_size=16, batch_size=4, num_workers=1, shuffle_buffer=8)

        def read_an_epoch(data=data, seed=seed):
            batches = DaliBatches(data, seed=seed, device="cpu")
            for _ in range(batches.sizes.batches):
                batches.next()

        with pytest.raises(DataError) as caught:  # DALI cannot skip: every shard has random bytes in it
            finishes_within(60, read_an_epoch)
        message = str(caught.value)
        single_line(message)
        assert shard in message and ("corrupt sample" in message or "DALI pipeline failed" in message), message
        assert "Current pipeline object" not in message and 'File "' not in message


def test_dali_failure_without_a_corrupt_sample_is_still_one_line(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from dtengine.data import dali

    shard = one_shard(tmp_path, [{"__key__": f"k{i}", "jpg": b"\xff\xd8\xff junk"} for i in range(4)])
    monkeypatch.setattr(dali, "load_sample", lambda sample, size: None)  # our decoder finds nothing wrong
    batches = dali.DaliBatches(DataConfig(shards=shard, image_size=16, batch_size=2, num_workers=1), seed=0)
    with pytest.raises(DataError, match=r"^DALI pipeline failed \(") as caught:
        finishes_within(60, batches.next)
    single_line(str(caught.value))
    assert "Current pipeline object" not in str(caught.value) and "check-shards" in str(caught.value)

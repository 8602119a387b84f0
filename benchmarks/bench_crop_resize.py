"""The CPU loaders' crop resize, per image on one thread: into a batch the way F.interpolate allows, and straight in.

    python benchmarks/bench_crop_resize.py              # 200 of bench_input's 2,000 generated JPEGs (made once)

Each image is decoded once; its crop (a random-resized window, or with --crop center the whole image) is then
resized to --size into a uint8 batch over NHWC memory, the layout the loaders hand out, two ways:

    interpolate   F.interpolate (antialiased, bilinear / bicubic) and a copy of its NCHW result into the batch
    into-batch    the loaders' way (`resize_window` / `center_crop` with `out=`): torch's uint8 kernel writes the
                  batch's slot directly

ms per image is the median of --reps passes over all images. Writes benchmarks/results/bench_crop_resize_<device>.
{csv,md} and ends with one line per way: way=<name> ms_per_image=<x> vs_interpolate=<ratio>
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_input import generated_images  # noqa: E402

from common import RESULTS, append_csv, device_slug, environment, format_environment, markdown_table  # noqa: E402


def crops(folder: Path, count: int, size: int, crop: str) -> list[torch.Tensor]:
    """(h, w, 3) uint8 views: each image's random-resized window (torchvision's box, seeded), or the whole image."""
    import simplejpeg

    from dtengine.data.decode import Crop, random_resized_box

    views, rng = [], random.Random(0)
    for path in sorted((folder / "all").glob("*.jpg"))[:count]:
        image = torch.from_numpy(simplejpeg.decode_jpeg(path.read_bytes()))
        if crop == "random_resized":
            left, top, right, bottom = random_resized_box(image.shape[1], image.shape[0], Crop(size, crop), rng)
            image = image[top:bottom, left:right]
        views.append(image)
    return views


def by_interpolate(view: torch.Tensor, size: int, crop: str, slot: torch.Tensor) -> None:
    from dtengine.data.decode import center_geometry

    chw = view.permute(2, 0, 1)[None]
    if crop == "random_resized":
        slot.copy_(F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        return
    (width, height), (left, top, right, bottom) = center_geometry(view.shape[1], view.shape[0], size)
    resized = F.interpolate(chw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    slot.copy_(resized[:, top:bottom, left:right])


def into_batch(view: torch.Tensor, size: int, crop: str, slot: torch.Tensor) -> None:
    from dtengine.data.decode import center_crop, resize_window

    (resize_window if crop == "random_resized" else center_crop)(view, size, out=slot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images measured")
    parser.add_argument("--generated", type=int, default=2000, help="bench_input's set of generated images to use")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--crop", choices=["random_resized", "center"], default="random_resized")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--csv", help="default: benchmarks/results/bench_crop_resize_<device>.csv")
    args = parser.parse_args()

    from dtengine.data.decode import image_batch
    from dtengine.runtime.io import cache_dir

    env = environment()
    print(format_environment(env), flush=True)
    torch.set_num_threads(1)  # as the loaders resize: one thread, beside the decoding ones
    folder = generated_images(args.generated, cache_dir() / f"bench-input-v2-{args.generated}" / "images")
    views = crops(folder, args.count, args.size, args.crop)
    batch = image_batch(len(views), args.size)
    times: dict[str, list[float]] = {"interpolate": [], "into-batch": []}
    for _ in range(args.reps):
        for name, way in (("interpolate", by_interpolate), ("into-batch", into_batch)):
            start = time.perf_counter()
            for view, slot in zip(views, batch):
                way(view, args.size, args.crop, slot)
            times[name].append((time.perf_counter() - start) * 1e3 / len(views))
    reference = statistics.median(times["interpolate"])
    pixels = statistics.mean(v.shape[0] * v.shape[1] for v in views)
    rows = []
    for name, values in times.items():
        ms = statistics.median(values)
        rows.append({
            **env, "way": name, "crop": args.crop, "size": args.size, "images": len(views),
            "mean_crop_px": round(pixels), "ms_per_image": round(ms, 4), "vs_interpolate": round(reference / ms, 2),
        })  # fmt: skip
    suffix = "" if args.crop == "random_resized" else "_center"
    csv_path = Path(args.csv) if args.csv else RESULTS / f"bench_crop_resize{suffix}_{device_slug(env['device'])}.csv"
    append_csv(csv_path, rows)
    table = markdown_table(rows, ["way", "ms_per_image", "vs_interpolate", "crop", "size", "images", "mean_crop_px"])
    csv_path.with_suffix(".md").write_text(
        f"# bench_crop_resize\n\n{format_environment(env)}\n\n{args.crop} crops of bench_input's generated JPEGs to "
        f"{args.size} px into a uint8 NHWC batch, one thread; ms per image = median of {args.reps} passes.\n\n"
        f"{table}\n"
    )
    print(table)
    for row in rows:
        print(f"way={row['way']} ms_per_image={row['ms_per_image']} vs_interpolate={row['vs_interpolate']}")


if __name__ == "__main__":
    main()

"""Input throughput: each dtengine loader against torchvision's ImageFolder + DataLoader over the same JPEGs.

    python benchmarks/bench_input.py                    # 2,000 generated JPEGs of 320-500 px (made once, cached)
    python benchmarks/bench_input.py --images DIR       # your folder of JPEGs instead (sharded once, cached)

Every loader makes the same batches: random-resized crops to --size (224) as uint8 tensors (or with --crop center
the paper's centre crops: the shorter side resized to --size, bicubic, then cropped), with the same number of
worker processes (DALI: threads), side by side in one run:

    imagefolder   the baseline: torchvision.datasets.ImageFolder + DataLoader, the transforms v2
                  RandomResizedCrop(antialias=True) (--crop center: Resize(bicubic, antialias=True) + CenterCrop)
                  + RandomHorizontalFlip on the PIL images ImageFolder yields, then ToImage (uint8 out);
                  pin_memory on CUDA
    imagefolder-tensor
                  the same with ToImage first, as torchvision's performance advice has it (torch's uint8 kernels
                  crop and resize instead of PIL's): a second, faster baseline (column vs_tensor_recipe)
    wds           dtengine's ShardStream over the same images as WebDataset shards (libjpeg-turbo decode, at
                  reduced scale where the crop allows; torch's uint8 resize; batches written straight into tensors)
    dali          dtengine's DALI pipeline over the same shards (GPU decoding on CUDA, a CPU pipeline elsewhere)
    synthetic     random device-resident batches: no input at all, the ceiling

img/s per loader is the median of --rounds rounds (the loaders take turns within a round); each round opens a
fresh loader, takes --warmup batches, then times --batches. Writes benchmarks/results/bench_input_<device>.
{csv,md,png} (bench_input_center_<device>.* with --crop center) and ends with one line per loader:
    loader=<name> img_per_s=<x> vs_baseline=<ratio>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    append_csv,
    device_slug,
    environment,
    format_environment,
    markdown_table,
    past_deadline,
    save_figure,
)

LOADERS = ("imagefolder", "imagefolder-tensor", "wds", "dali", "synthetic")
IMAGE_SIDES = (320, 500)  # each side drawn in this range: real-sized images of mixed aspect ratios
CROP_WORDS = {"random_resized": "Random-resized crops", "center": "Centre crops"}
NOISE = 16.0  # sensor-like noise (std, 0-255): photo-like entropy, ~0.46 JPEG bytes per pixel at quality 90


def generated_images(count: int, folder: Path) -> Path:
    """`count` JPEGs of 320-500 px a side in `folder/all/`, made once: the built-in renderer's shapes plus
    sensor-like noise, so that they cost what photographs cost to decode (the clean renders compress 6x better
    than photos and would make decoding look nearly free)."""
    from PIL import Image

    from dtengine.data import render_sample

    images = folder / "all"
    if images.is_dir() and len(list(images.glob("*.jpg"))) == count:
        return folder
    images.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng(index)
        width, height = (int(side) for side in rng.integers(*IMAGE_SIDES, 2, endpoint=True))
        picture, _, _ = render_sample(rng, max(width, height))
        noisy = picture[:height, :width] + rng.normal(0.0, NOISE, (height, width, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(images / f"{index:06d}.jpg", quality=90)
    return folder


def sharded(folder: Path, cache: Path) -> str:
    """The folder's images as WebDataset shards (written once into `cache`); returns the shard pattern."""
    from dtengine.data import make_shards_from_folder

    shards = sorted(cache.glob("shard-*.tar"))
    if not shards:
        shards = make_shards_from_folder(folder, cache, samples_per_shard=250).shards
    return str(cache / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")


def imagefolder_batches(folder: Path, args, device: torch.device, tensor_first: bool = False):
    from torchvision import datasets
    from torchvision.transforms import v2

    if args.crop == "center":
        crop = [v2.Resize(args.size, v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(args.size)]
    else:
        crop = [v2.RandomResizedCrop(args.size, antialias=True)]
    crop_and_flip = [*crop, v2.RandomHorizontalFlip()]
    if tensor_first:  # torchvision's performance advice: a uint8 tensor first, so torch's kernels crop and resize
        transform = v2.Compose([v2.ToImage(), *crop_and_flip])
    else:  # the transforms on the PIL image ImageFolder yields (PIL resizes), then the uint8 tensor
        transform = v2.Compose([*crop_and_flip, v2.ToImage()])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=transform), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
    )  # fmt: skip
    return (images for images, _ in loader)


def dtengine_batches(name: str, pattern: str, args, device: torch.device):
    from dtengine.data import DataConfig
    from dtengine.data.loaders import open_batches

    cfg = DataConfig(
        shards=pattern, loader=name, image_size=args.size, crop=args.crop, batch_size=args.batch,
        num_workers=args.workers, shuffle_buffer=256,
    )  # fmt: skip
    batches, _ = open_batches(cfg, seed=0, device=device)
    while True:
        yield batches.next()["image"]


def measure(batches, args, device: torch.device) -> float:
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        images = next(batches).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert images.dtype == torch.uint8 and images.shape[-2:] == (args.size, args.size)
    return args.batches * args.batch / (time.perf_counter() - start)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [r["loader"].replace("-", "\n") for r in rows]  # "imagefolder\ntensor": labels side by side
    bars = ax.bar(names, [r["img_per_s"] for r in rows], color="#4a7")
    ax.margins(y=0.18)  # room for the bars' labels under the title
    ax.bar_label(bars, labels=[f"{r['img_per_s']:.0f}\n{r['vs_baseline']}x" for r in rows], fontsize=8)
    ax.set_ylabel("images / s (median of rounds)")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder of JPEGs (default: 2,000 generated ones)")
    parser.add_argument("--count", type=int, default=2000, help="generated images")
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--crop", choices=list(CROP_WORDS), default="random_resized")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (DALI: threads) of every loader")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--csv", help="default: benchmarks/results/bench_input_<device>.csv")
    args = parser.parse_args()

    from dtengine.data.dali import dali_unavailable_reason
    from dtengine.runtime.io import cache_dir

    env = environment()
    print(format_environment(env), flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.images:
        folder, name = args.images.resolve(), f"bench-input-{args.images.resolve().name}"
        if not any(folder.rglob("*.jp*g")):
            sys.exit(f"bench_input: no JPEG files under '{folder}'")
    else:
        name = f"bench-input-v2-{args.count}"
        folder = generated_images(args.count, cache_dir() / name / "images")
    pattern = sharded(folder, cache_dir() / name / "shards")
    loaders = args.loaders.split(",")
    if "dali" in loaders and (reason := dali_unavailable_reason()):
        print(f"loader=dali: skipped ({reason})")
        loaders.remove("dali")
    runs: dict[str, list[float]] = {loader: [] for loader in loaders}
    for round_index in range(args.rounds):
        if round_index and past_deadline(f"round {round_index + 1}"):  # one whole round at least
            break
        for loader in loaders:
            if loader.startswith("imagefolder"):
                batches = imagefolder_batches(folder, args, device, tensor_first=loader == "imagefolder-tensor")
            else:
                batches = dtengine_batches(loader, pattern, args, device)
            runs[loader].append(measure(batches, args, device))
            print(f"round {round_index + 1}: {loader} {runs[loader][-1]:.0f} img/s", flush=True)
            del batches
    baseline = statistics.median(runs["imagefolder"]) if "imagefolder" in runs else None
    tensor_recipe = statistics.median(runs["imagefolder-tensor"]) if "imagefolder-tensor" in runs else None
    rows = []
    for loader, values in runs.items():
        speed = statistics.median(values)
        rows.append({
            **env, "loader": loader, "images": str(args.images or f"generated {args.count}"), "size": args.size,
            "crop": args.crop, "batch": args.batch, "workers": args.workers, "img_per_s": round(speed, 1),
            "rounds": " ".join(f"{v:.1f}" for v in values),
            "vs_baseline": "na" if baseline is None else round(speed / baseline, 2),
            "vs_tensor_recipe": "na" if tensor_recipe is None else round(speed / tensor_recipe, 2),
        })  # fmt: skip
    crop = "" if args.crop == "random_resized" else f"_{args.crop}"
    csv_path = Path(args.csv) if args.csv else RESULTS / f"bench_input{crop}_{device_slug(env['device'])}.csv"
    append_csv(csv_path, rows)
    columns = ["loader", "img_per_s", "vs_baseline", "vs_tensor_recipe", "rounds", "size", "crop", "batch"]
    columns += ["workers", "images"]
    table = markdown_table(rows, columns)
    csv_path.with_suffix(".md").write_text(
        f"# bench_input\n\n{format_environment(env)}\n\n{CROP_WORDS[args.crop]} to {args.size} px as uint8 batches of "
        f"{args.batch}, {args.workers} workers each; img/s = median of {len(values)} rounds of {args.batches} "
        f"batches after {args.warmup} warm-up batches.\n\n{table}\n"
    )
    plot(rows, csv_path.with_suffix(".png"), f"bench_input on {env['device']} ({env['commit']}, {env['date'][:10]})")
    print(table)
    for row in rows:
        print(f"loader={row['loader']} img_per_s={row['img_per_s']} vs_baseline={row['vs_baseline']}")


if __name__ == "__main__":
    main()

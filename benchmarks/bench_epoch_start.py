"""The input stall at each new epoch: the wds loader's next epoch started early, against started at the end.

    python benchmarks/bench_epoch_start.py                      # built-in data, 128 px, batch 32, 2 workers
    python benchmarks/bench_epoch_start.py --size 256 --batch 64 --workers 8 --step-ms 167

A `BatchCursor` feeds a simulated training step until --epochs new epochs have started after the first one, two
ways, one after the other:

    at-end   `early_start=False`: an epoch's workers start when the previous epoch has run out
    early    the default: they start once every batch left in the previous epoch has been asked for

The step is a sleep of --step-ms: a GPU step whose host thread only waits, so the loader has the CPU to itself,
as on a GPU node. Each `next()` is timed: the wait at the first batch of every epoch after the first
(epoch_start_wait_ms, their mean), the median wait of the other batches, and the stall, the waits' share of the
total time. Writes benchmarks/results/bench_epoch_start_<device>.{csv,md} and ends with one line per way:
    way=<at-end|early> epoch_start_wait_ms=<x> steady_wait_ms=<x> stall=<x>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_slug, environment, format_environment, save_results  # noqa: E402

WAYS = {"at-end": False, "early": True}


def waits(stream, early_start: bool, epochs: int, step_s: float) -> tuple[list[float], list[float], float]:
    """(waits at epoch starts, other waits, total seconds) over `epochs` epochs after the first batch."""
    from dtengine.data.shard_stream import BatchCursor

    cursor = BatchCursor(stream, early_start=early_start)
    cursor.next()  # the first epoch's start-up: the same either way, not measured
    at_epoch_start, steady = [], []
    begin = time.perf_counter()
    while cursor.epoch < epochs:
        start = time.perf_counter()
        cursor.next()
        waited = time.perf_counter() - start
        (at_epoch_start if cursor.batch_in_epoch == 1 else steady).append(waited)
        time.sleep(step_s)
    return at_epoch_start, steady, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image side of the built-in data")
    parser.add_argument("--images", type=int, default=1024, help="built-in training images (an epoch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=150.0, help="the simulated step")
    parser.add_argument("--epochs", type=int, default=4, help="new epochs measured (after the first)")
    parser.add_argument("--csv", help="default: benchmarks/results/bench_epoch_start_<device>.csv")
    args = parser.parse_args()

    from dtengine.data import DataConfig, ShardStream, builtin_dataset
    from dtengine.runtime.io import cache_dir

    env = environment()
    print(format_environment(env), flush=True)
    data = builtin_dataset(
        cache_dir() / "bench-epoch-start", image_size=args.size, num_train=args.images, num_val=args.batch,
        samples_per_shard=max(1, args.images // (4 * args.workers)),
    )  # fmt: skip
    cfg = DataConfig(shards=data.train_pattern, image_size=args.size, batch_size=args.batch, num_workers=args.workers)
    rows = []
    for way, early_start in WAYS.items():
        stream = ShardStream(cfg, seed=0)
        at_epoch_start, steady, total = waits(stream, early_start, args.epochs, 1e-3 * args.step_ms)
        rows.append({
            **env, "way": way, "size": args.size, "batch": args.batch, "workers": args.workers,
            "step_ms": args.step_ms, "batches_per_epoch": stream.batches_per_epoch(0),
            "epoch_starts": len(at_epoch_start),
            "epoch_start_wait_ms": round(1e3 * statistics.mean(at_epoch_start), 2),
            "steady_wait_ms": round(1e3 * statistics.median(steady), 3),
            "stall": round((sum(at_epoch_start) + sum(steady)) / total, 4),
        })  # fmt: skip
        print(f"{way}: {rows[-1]['epoch_start_wait_ms']} ms at each epoch start", flush=True)
    csv_path = Path(args.csv) if args.csv else RESULTS / f"bench_epoch_start_{device_slug(env['device'])}.csv"
    columns = ["way", "epoch_start_wait_ms", "steady_wait_ms", "stall", "epoch_starts", "batches_per_epoch"]
    columns += ["size", "batch", "workers", "step_ms"]
    save_results(
        csv_path, rows, columns, "bench_epoch_start: the input stall at each new epoch", env,
        f"The wds loader (built-in data, {args.images} images) feeding a {args.step_ms:g} ms sleep as the step, "
        f"until {args.epochs} new epochs had started; waits in ms per `next()`; stall = all waits / total time.",
    )  # fmt: skip
    for row in rows:
        print(f"way={row['way']} epoch_start_wait_ms={row['epoch_start_wait_ms']} "
              f"steady_wait_ms={row['steady_wait_ms']} stall={row['stall']}")  # fmt: skip


if __name__ == "__main__":
    main()

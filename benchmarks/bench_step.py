"""Time the training step users run: `Distiller` forward + backward and the real optimizer step.

    python benchmarks/bench_step.py [--config configs/demo.yaml] [--steps 20] [--warmup 3] [key=value ...]

Two passes over the same step, built by `Distiller.from_config` and `train.optim` exactly as `dtengine distill`
builds it (flips, keyed noise, clipping, schedule, label modes included):

    steady   `steps` whole steps, the device synchronised only at the ends: img/s of the step as the trainer
             runs it (data loading included, as in training)
    split    `steps` more, synchronised around each part: data wait, inputs (to device, flips, noise),
             teacher, student forward+backward, optimizer; the split shows which part bounds the step

Prints the environment (device, versions, commit, date), a markdown table, and appends a CSV row to
benchmarks/results/bench_step.csv (its .md report keeps every row recorded so far).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtengine import load_config  # noqa: E402
from dtengine.data.shard_stream import BatchCursor, ShardStream  # noqa: E402
from dtengine.distill import Distiller  # noqa: E402
from dtengine.runtime.device import SampleKeys, seed_everything  # noqa: E402
from dtengine.train.optim import build_optimizer, build_scheduler, optimizer_step  # noqa: E402

from common import RESULTS, Timer, append_csv, environment, format_environment, markdown_table, synchronize  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--csv", default=str(RESULTS / "bench_step.csv"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    env = environment()
    print(format_environment(env))
    seed_everything(cfg.train.seed)
    distiller = Distiller.from_config(cfg).train()
    device = distiller.device
    optimizer = build_optimizer(distiller, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, args.warmup + 2 * args.steps)
    cursor = BatchCursor(ShardStream(cfg.data, seed=cfg.train.seed))
    batch_size, accum = cfg.data.batch_size, cfg.train.grad_accum
    timer = Timer(device)
    step = 0

    def whole_step() -> None:
        nonlocal step
        for micro in range(accum):
            losses = distiller(cursor.next()["image"], step=step, first_index=micro * batch_size)
            (losses["loss"] / accum).backward()
        optimizer_step(distiller, optimizer, scheduler, cfg.optim.grad_clip)
        step += 1

    def split_step() -> None:
        nonlocal step
        for micro in range(accum):
            with timer.section("data_wait"):
                images = cursor.next()["image"]
            with timer.section("inputs"):
                images, noise = distiller.inputs(images, SampleKeys(distiller.seed, step, micro * batch_size))
            with timer.section("teacher"):
                targets = distiller.teacher_targets(images, noise)
            with timer.section("student_fwd_bwd"):
                (distiller.student_losses(targets.images, targets)["loss"] / accum).backward()
        with timer.section("optimizer"):
            optimizer_step(distiller, optimizer, scheduler, cfg.optim.grad_clip)
        step += 1

    for _ in range(args.warmup):
        whole_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        whole_step()
    synchronize(device)
    steady = time.perf_counter() - start
    for _ in range(args.steps):
        split_step()
    row = {
        **env,
        "student": cfg.student.model,
        "teacher": cfg.teacher.path,
        "mode": cfg.distill.mode,
        "image_size": cfg.data.image_size,
        "batch": batch_size * accum,
        "steps": args.steps,
        "img_per_s": round(args.steps * batch_size * accum / steady, 2),
        "step_ms": round(1000 * steady / args.steps, 2),
        **{f"{name}_ms": round(1000 * t / args.steps, 2) for name, t in timer.totals.items()},
    }
    csv_path = Path(args.csv)
    append_csv(csv_path, [row])
    timing_columns = ["img_per_s", "step_ms"] + [k for k in row if k.endswith("_ms") and k != "step_ms"]
    print(markdown_table([row], ["student", "batch", "image_size", *timing_columns]))
    # The markdown report holds every row recorded so far, newest last, next to the CSV.
    with csv_path.open() as handle:
        history = list(csv.DictReader(handle))
    columns = ["date", "commit", "device", "student", "batch", "image_size", *timing_columns]
    report = csv_path.with_suffix(".md")
    table = markdown_table([{c: r.get(c, "") for c in columns} for r in history], columns)
    report.write_text(
        "# bench_step results\n\nimg/s and step_ms: whole `Distiller` steps with the optimizer step, synchronised "
        "only at the ends; the *_ms parts: a second pass synchronised around each part (rows before the "
        "`Distiller` existed timed a hand-copied step, without inputs_ms or step_ms; a commit ending in +dirty had "
        "uncommitted changes).\n\n" + table + "\n"
    )
    print(f"appended to {csv_path}; report: {report}")


if __name__ == "__main__":
    main()

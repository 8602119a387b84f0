"""Time one distillation step and its parts: data wait, teacher pass, student forward+backward, optimizer.

    python benchmarks/bench_step.py [--config configs/demo.yaml] [--steps 20] [--warmup 3] [key=value ...]

Prints the environment (device, versions, commit, date), a markdown table, and appends a CSV row to
benchmarks/results/bench_step.csv. Throughput is images per second of the whole step; the split shows which
part bounds it (the goal: the teacher and student, never the data wait).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtengine.config import load_config  # noqa: E402
from dtengine.data.loader import ShardStream  # noqa: E402
from dtengine.losses.feature_distillation import feature_distillation_terms  # noqa: E402
from dtengine.students.student import DistillationStudent  # noqa: E402
from dtengine.teachers.diffusion import build_diffusion_teacher  # noqa: E402
from dtengine.train.device import autocast, autocast_dtype, resolve_device, use_channels_last  # noqa: E402
from dtengine.train.optim import build_optimizer  # noqa: E402

from common import RESULTS, Timer, append_csv, environment, format_environment, markdown_table  # noqa: E402

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
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    teacher = build_diffusion_teacher(cfg.teacher, device)
    student = DistillationStudent(cfg.student, teacher.levels).to(device).train()
    if use_channels_last(device):
        student = student.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(student, cfg.optim)
    amp = autocast_dtype(cfg.train.precision, device)
    batches = ShardStream(cfg.data, seed=cfg.train.seed).epoch(0)
    timer = Timer(device)

    def step() -> None:
        with timer.section("data_wait"):
            images = next(batches)["image"].to(device).float().div_(255)
        with timer.section("teacher"):
            target = teacher(images)
        with timer.section("student_fwd_bwd"):
            with autocast(device, amp):
                predicted = student(target.images, [f.shape[-2:] for f in target.features])
            feature_distillation_terms(predicted, target.features, cfg.loss)["loss"].backward()
        with timer.section("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    timer.totals.clear()
    for _ in range(args.steps):
        step()
    total = sum(timer.totals.values())
    row = {
        **env,
        "student": cfg.student.model,
        "teacher": cfg.teacher.path,
        "image_size": cfg.data.image_size,
        "batch": cfg.data.batch_size,
        "steps": args.steps,
        "img_per_s": round(args.steps * cfg.data.batch_size / total, 2),
        **{f"{name}_ms": round(1000 * t / args.steps, 2) for name, t in timer.totals.items()},
    }
    csv_path = Path(args.csv)
    append_csv(csv_path, [row])
    timing_columns = ["img_per_s"] + [k for k in row if k.endswith("_ms")]
    print(markdown_table([row], ["student", "batch", "image_size", *timing_columns]))
    # The markdown report holds every row recorded so far, newest last, next to the CSV.
    with csv_path.open() as handle:
        history = list(csv.DictReader(handle))
    columns = ["date", "commit", "device", "student", "batch", "image_size", *timing_columns]
    report = csv_path.with_suffix(".md")
    report.write_text(f"# bench_step results\n\n{markdown_table(history, columns)}\n")
    print(f"appended to {csv_path}; report: {report}")


if __name__ == "__main__":
    main()

"""The training step, three ways side by side: a hand-written eager loop, the engine eager, the engine compiled.

    python benchmarks/bench_step.py                                   # the configs this device can run
    python benchmarks/bench_step.py --configs demo --modes eager,compiled [key=value ...]

Configurations:
    demo              the built-in teacher and data (configs/demo.yaml): runs on a CPU
    paper-r50         the paper's teacher network, guided-diffusion's ADM-256 (teacher.kind=adm, preset
    paper-convnext-b  imagenet256-uncond: 552.8 M parameters) with random weights, output blocks 2, 5, 8, 11
                      (strides 32, 16, 8, 4) at t=150, ResNet-50 / ConvNeXt-B student, 256 px images of the
                      built-in data, batch 64: needs a GPU, no weights
Modes:
    naive     benchmarks/naive_loop.py: ImageFolder over JPEGs, full teacher forward with hooks, the unfused
              reference loss, plain AdamW (bf16 autocast + cudnn.benchmark on CUDA, like the engine)
    eager     the engine's `Distiller` step (shard stream, early-exit teacher, fused ops where they run, fused
              AdamW) with compile off
    compiled  the same with `apply_compile` (teacher pass with CUDA graphs on CUDA, student pass fullgraph)
    synthetic `compiled` fed by the synthetic loader (random batches made on the device): no input at all. Its
              img/s against `compiled` gives the input stall, 1 - compiled / synthetic

Each (config, mode) runs in its own process, so peak memory and compiled code are its own. It warms up (and
compiles; `warmup_s`), then times 3 windows of whole steps, synchronising only at their ends: img/s is their
median. A separate instrumented pass times the parts (data wait, inputs, teacher, student forward+backward,
optimizer) with a sync around each. FLOPs per image are the engine's useful work, counted once per config with
torch.utils.flop_counter: the teacher up to its last tap plus the student forward and backward. MFU divides
their rate by the device's dense bf16 peak (na on a CPU, or an unknown GPU).

Writes benchmarks/results/bench_step_<device>.{csv,md,png} and ends with one line per config and mode:
    config=<name> mode=<naive|eager|compiled> img_per_s=<x> vs_eager=<ratio> vs_naive=<ratio> mfu=<x|na>
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEADLINE_ENV,
    RESULTS,
    Timer,
    append_csv,
    device_slug,
    environment,
    format_environment,
    markdown_table,
    past_deadline,
    save_figure,
    seconds_to_deadline,
    synchronize,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("demo", "paper-r50", "paper-convnext-b")
MODES = ("naive", "eager", "compiled", "synthetic")
PAPER_STUDENTS = {"paper-r50": "resnet50", "paper-convnext-b": "convnext_base"}
PAPER_OVERRIDES = [
    "teacher.kind=adm", "teacher.weights=untrained", "teacher.adm.preset=imagenet256-uncond",
    "teacher.timestep=150", "teacher.blocks=[2,5,8,11]", "data.shards=builtin", "data.image_size=256",
    "data.batch_size=64", "data.num_workers=8", "data.shuffle_buffer=1000", "optim.warmup_steps=10",
]  # fmt: skip
PEAK_BF16_TFLOPS = {"h100": 989.4, "h200": 989.4, "a100": 312.0, "l40s": 362.0, "l4": 121.0}
"""Dense bf16 peak (TFLOP/s, no sparsity) by GPU family, matched in the device name; H100 PCIe is lower (756)."""
PART_NAMES = ("data_wait", "inputs", "teacher", "student_fwd_bwd", "optimizer")


def peak_flops(device_name: str) -> float | None:
    name = device_name.lower()
    if "h100" in name and "pcie" in name:
        return 756e12
    return next((tflops * 1e12 for family, tflops in PEAK_BF16_TFLOPS.items() if family in name), None)


# ----------------------------------------------------------------------------------------------- one worker --
def run_config(name: str, overrides: list[str]):
    from dtengine import load_config

    if name == "demo":
        return load_config(ROOT / "configs" / "demo.yaml", overrides)
    paper = [*PAPER_OVERRIDES, f"student.model={PAPER_STUDENTS[name]}"]
    return load_config(ROOT / "configs" / "demo.yaml", [*paper, *overrides])  # the user's last: e.g. data.loader=dali


def build_teacher(name: str, cfg, device: torch.device):
    """The run's teacher: the configured one (demo: the shipped DDPM), or the paper's, guided-diffusion's ADM-256
    network (552.8 M parameters, output blocks 2, 5, 8, 11) with random weights, built on the device."""
    from dtengine.teachers import build_teacher as build_configured_teacher

    with torch.device(device):  # initialise the 553 M parameters where they will run
        return build_configured_teacher(cfg.teacher, device)


def engine_step(name: str, cfg, world, compiled: bool):
    """(whole step, instrumented step, FLOPs per image) of the engine, built as `dtengine distill` builds it; under
    torchrun, one rank of a DDP job."""
    from torch.utils.flop_counter import FlopCounterMode

    from dtengine.data.loaders import open_batches
    from dtengine.distill import Distiller
    from dtengine.parallel.compile import CompileConfig, apply_compile, student_compiles
    from dtengine.parallel.distributed import gradient_sync, wrap_student
    from dtengine.runtime.device import SampleKeys, seed_everything
    from dtengine.train.optim import build_optimizer, build_scheduler, optimizer_step

    device = world.device
    seed_everything(cfg.train.seed)
    distiller = Distiller(
        build_teacher(name, cfg, device), cfg.student.model, loss=cfg.loss, distill=cfg.distill,
        student_cfg=cfg.student, precision=cfg.train.precision, hflip=cfg.train.hflip, seed=cfg.train.seed,
    ).place(device).train()  # fmt: skip
    optimizer = build_optimizer(distiller, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10_000)
    cursor, _ = open_batches(cfg.data, cfg.train.seed, world.rank, world.size, device=device)
    batch = cfg.data.batch_size
    with FlopCounterMode(display=False) as counter:  # eager, before compiling: the useful work of one step
        distiller(cursor.next()["image"], step=0)["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / batch
    compile_cfg = CompileConfig(**{**vars(cfg.compile), "enabled": True}) if compiled else CompileConfig(enabled=False)
    apply_compile(distiller, compile_cfg, student=not world.distributed)
    inside_ddp = compile_cfg if world.distributed and student_compiles(compile_cfg, device) else None
    wrap_student(distiller, world, cfg.distributed, inside_ddp)
    state = {"step": 1}

    def whole() -> None:
        first_index = world.rank * batch
        with gradient_sync(distiller, enabled=True):
            distiller(cursor.next()["image"], step=state["step"], first_index=first_index)["loss"].backward()
        optimizer_step(distiller, optimizer, scheduler, cfg.optim.grad_clip)
        state["step"] += 1

    def instrumented(timer: Timer) -> None:
        with timer.section("data_wait"):
            images = cursor.next()["image"]
        with timer.section("inputs"):
            images, noise = distiller.inputs(images, SampleKeys(distiller.seed, state["step"], 0))
        with timer.section("teacher"):
            targets = distiller.teacher_targets(images, noise)
        with timer.section("student_fwd_bwd"):
            distiller.student_losses(targets.images, targets)["loss"].backward()
        with timer.section("optimizer"):
            optimizer_step(distiller, optimizer, scheduler, cfg.optim.grad_clip)
        state["step"] += 1

    return whole, instrumented, flops_per_image


def jpeg_folder(cfg, out: Path) -> Path:
    """The run's training images as JPEG files in one ImageFolder class folder (what a naive loop reads)."""
    from dtengine.data.pipeline import read_shards
    from dtengine.data.shard_stream import resolve_shards

    folder = out / "images" / "all"
    folder.mkdir(parents=True)
    for sample in read_shards({"url": url} for url in resolve_shards(cfg.data.shards, cfg.data.builtin_root,
                                                                     cfg.data.image_size)):  # fmt: skip
        (folder / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
    return folder.parent


def naive_step(name: str, cfg, device: torch.device, scratch: Path):
    from naive_loop import NaiveDistillation

    from dtengine.runtime.device import seed_everything, seeded
    from dtengine.students.student import DistillationStudent

    seed_everything(cfg.train.seed)
    teacher = build_teacher(name, cfg, device)
    with seeded(cfg.train.seed):
        student = DistillationStudent(cfg.student, teacher.levels).to(device).train()
    loop = NaiveDistillation(
        teacher.unet, teacher.scheduler, list(teacher.cfg.blocks), cfg.teacher.timestep, student,
        jpeg_folder(cfg, scratch), cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers, cfg.optim.lr,
        device,
    )  # fmt: skip

    def instrumented(timer: Timer) -> None:
        with timer.section("data_wait"):
            images = loop.next_batch()
        with timer.section("inputs"):
            images = loop.to_device(images)
        with timer.section("teacher"):
            targets = loop.teacher_features(images)
        with timer.section("student_fwd_bwd"):
            loss = loop.student_backward(images, targets)
        with timer.section("optimizer"):
            loop.optimizer_step(loss)

    return loop.step, instrumented


class Progress:
    """Worker progress on stderr, each line with the seconds since the measurement began: the parent prints the tail
    of a worker that fails or times out, which then says where the time went (a cold compile of the paper configs
    takes minutes)."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled, self.start = what, enabled, time.perf_counter()

    def __call__(self, done: str) -> None:
        if self.enabled:
            print(f"[{self.what}] {time.perf_counter() - self.start:.1f} s: {done}", file=sys.stderr, flush=True)


def measure(args) -> dict:
    """One (config, mode) in this process (one rank, under torchrun): warm-up, timed windows, instrumented pass,
    peak memory. Windows start and end with every rank in step, and img/s counts all ranks' images."""
    from dtengine.parallel.distributed import init_world, shutdown
    from dtengine.runtime.device import peak_memory_gb

    cfg = run_config(args.config, args.overrides)
    world = init_world(cfg.train.device, cfg.distributed)
    device = world.device
    progress = Progress(f"{args.config} {args.mode}", world.rank == 0)
    with tempfile.TemporaryDirectory() as scratch:
        flops = None
        if args.mode == "naive":
            whole, instrumented = naive_step(args.config, cfg, device, Path(scratch))
        else:
            if args.mode == "synthetic":
                cfg.data.loader = "synthetic"
            whole, instrumented, flops = engine_step(args.config, cfg, world, args.mode != "eager")
        progress("set up (data, models, FLOP count)")
        start = time.perf_counter()
        for step in range(args.warmup):
            whole()
            synchronize(device)
            progress(f"warm-up step {step + 1}/{args.warmup} (compiles on the first)")
        warmup_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        windows = []
        for _ in range(args.windows):
            synchronize(device)
            world.barrier()
            start = time.perf_counter()
            for _ in range(args.window_steps):
                whole()
            synchronize(device)
            world.barrier()
            windows.append(args.window_steps * cfg.data.batch_size * world.size / (time.perf_counter() - start))
            progress(f"timed window {len(windows)}/{args.windows}: {windows[-1]:.1f} img/s")
        timer = Timer(device)
        for _ in range(args.split_steps):
            instrumented(timer)
        progress("instrumented pass")
        shutdown(world)
    return {
        "config": args.config,
        "mode": args.mode,
        "student": cfg.student.model,
        "image_size": cfg.data.image_size,
        "batch": cfg.data.batch_size,
        "world_size": world.size,
        "overrides": " ".join(args.overrides),
        "img_per_s": statistics.median(windows),
        "windows": [round(w, 2) for w in windows],
        "warmup_s": round(warmup_s, 1),
        "flops_per_image": flops,
        **{k: round(v, 3) for k, v in peak_memory_gb(device).items()},
        **{f"{part}_ms": round(1000 * timer.totals.get(part, 0.0) / args.split_steps, 2) for part in PART_NAMES},
    }


# ------------------------------------------------------------------------------------------------ the run ---
def run_worker(config: str, mode: str, args, world_size: int = 1) -> dict | str:
    """Measure one (config, mode) in a subprocess (a torchrun job of `world_size` ranks when more than one); its
    result dict, or the reason it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [__file__, "--worker", config, mode, "--result", out.name, *worker_flags(args)]
        env = dict(os.environ)
        if args.world_sizes:  # a sweep: every rank gets one thread on a CPU, the 1-rank reference too
            env.setdefault("OMP_NUM_THREADS", "1")
        if world_size > 1:
            command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}", *command]
        # Never past the suite's deadline either, so the modes already measured are still written.
        timeout_s = min(args.timeout_s, max(1, seconds_to_deadline()))
        try:
            proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout_s,
                                  env=env)  # fmt: skip
        except subprocess.TimeoutExpired as timeout:
            limit = "--timeout-s" if timeout_s == args.timeout_s else DEADLINE_ENV
            print_output_tail(f"config={config} mode={mode} (timed out)", timeout.stderr, timeout.stdout)
            return f"timed out after {timeout_s:.0f} s ({limit})"
        if proc.returncode != 0:
            output = print_output_tail(f"config={config} mode={mode}", proc.stderr, proc.stdout)
            return failure_reason(output, proc.returncode)
        return json.loads(Path(out.name).read_text())


def print_output_tail(what: str, stderr: str | bytes | None, stdout: str | bytes | None) -> str:
    """Print the last 30 lines a worker wrote (stderr, else stdout) and return all of it. A timed-out worker's
    partial output comes as bytes: it says where the time went (compiling, generating data, a hang)."""
    texts = [text.decode(errors="replace") if isinstance(text, bytes) else text or "" for text in (stderr, stdout)]
    output = texts[0].strip() or texts[1].strip()
    print(f"--- {what}, the end of its output:", *output.splitlines()[-30:], sep="\n")
    return output


def failure_reason(output: str, returncode: int) -> str:
    """The exception line of a failed worker's output (the last line is often advice, e.g. dynamo's "Set
    TORCHDYNAMO_VERBOSE=1 ..."), else its last line, else its exit code."""
    lines = output.splitlines()
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Unsupported|Exit)\b[^ ]*: ", line)]
    return (raised or lines or [f"exit code {returncode}"])[-1].strip()[:200]


def worker_flags(args) -> list[str]:
    flags = ["--warmup", str(args.warmup), "--windows", str(args.windows)]
    flags += ["--window-steps", str(args.window_steps), "--split-steps", str(args.split_steps)]
    return [*flags, *args.overrides]


def summarise(results: list[dict], env: dict) -> list[dict]:
    """CSV rows: every result with its environment, ratios to the same config's eager and naive modes, MFU."""
    peak = peak_flops(env["device"])
    rows = []
    for result in results:
        same = {r["mode"]: r for r in results if r["config"] == result["config"]}
        flops = next((r["flops_per_image"] for r in same.values() if r.get("flops_per_image")), None)
        ratio = {base: (result["img_per_s"] / same[base]["img_per_s"]) if base in same else None
                 for base in ("eager", "naive")}  # fmt: skip
        mfu = flops * result["img_per_s"] / peak if flops and peak else None
        rows.append({
            **env, **{k: v for k, v in result.items() if k not in ("flops_per_image", "windows")},
            "img_per_s": round(result["img_per_s"], 2), "windows": " ".join(map(str, result["windows"])),
            "vs_eager": "na" if ratio["eager"] is None else round(ratio["eager"], 3),
            "vs_naive": "na" if ratio["naive"] is None else round(ratio["naive"], 3),
            "gflops_per_image": "na" if flops is None else round(flops / 1e9, 2),
            "mfu": "na" if mfu is None else round(mfu, 4),
        })  # fmt: skip
    return rows


def input_stalls(rows: list[dict]) -> dict[str, dict]:
    """Per config: 1 - compiled / synthetic img/s (the share of step time lost to input) and compiled's data wait."""
    stalls = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = {r["mode"]: r for r in rows if r["config"] == config}
        if "compiled" in mine and "synthetic" in mine:
            stall = 1 - mine["compiled"]["img_per_s"] / mine["synthetic"]["img_per_s"]
            stalls[config] = {"stall": round(stall, 3), "data_wait_ms": mine["compiled"]["data_wait_ms"]}
    return stalls


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False)
    for ax, config in zip(axes[0], configs):
        mine = [r for r in rows if r["config"] == config]
        colors = {"naive": "#999", "eager": "#4a7", "compiled": "#27c", "synthetic": "#c84"}
        bars = ax.bar(
            [r["mode"] for r in mine], [r["img_per_s"] for r in mine], color=[colors[r["mode"]] for r in mine]
        )
        ax.bar_label(bars, labels=[f"{r['img_per_s']:.1f}" for r in mine], fontsize=8)
        ax.set_title(f"{config} ({mine[0]['student']}, {mine[0]['image_size']} px, batch {mine[0]['batch']})",
                     fontsize=9)  # fmt: skip
        ax.set_ylabel("images / s (median of windows)")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def sweep(args, configs: list[str], env: dict) -> None:
    """The scaling sweep: --sweep-mode at each world size, efficiency against one rank, CSV + report + lines."""
    rows = []
    for config in configs:
        single = None
        for world_size in (int(w) for w in args.world_sizes.split(",")):
            outcome = run_worker(config, args.sweep_mode, args, world_size)
            if isinstance(outcome, str):
                print(f"config={config} world_size={world_size}: failed ({outcome})", flush=True)
                continue
            single = outcome["img_per_s"] if world_size == 1 else single
            efficiency = outcome["img_per_s"] / (world_size * single) if single else None
            rows.append({
                **env, **{k: v for k, v in outcome.items() if k not in ("flops_per_image", "windows")},
                "img_per_s": round(outcome["img_per_s"], 2), "windows": " ".join(map(str, outcome["windows"])),
                "img_per_s_per_rank": round(outcome["img_per_s"] / world_size, 2),
                "scaling_efficiency": "na" if efficiency is None else round(efficiency, 3),
            })  # fmt: skip
            print(f"config={config} mode={args.sweep_mode} world_size={world_size} img_per_s={rows[-1]['img_per_s']} "
                  f"scaling_efficiency={rows[-1]['scaling_efficiency']}", flush=True)  # fmt: skip
    if not rows:
        sys.exit("bench_step: nothing was measured")
    path = Path(args.csv) if args.csv else RESULTS / f"bench_step_scaling_{device_slug(env['device'])}.csv"
    append_csv(path, rows)
    columns = ["date", "commit", "config", "mode", "world_size", "batch", "img_per_s", "img_per_s_per_rank",
               "scaling_efficiency"]  # fmt: skip
    with path.open() as handle:
        history = list(csv.DictReader(handle))
    path.with_suffix(".md").write_text(
        f"# bench_step scaling on {env['device']}\n\nEach world size is a torchrun job of that many ranks (DDP), "
        "per-rank batch as configured; scaling efficiency = img/s per rank / img/s of one rank. On a CPU every rank "
        "(and the 1-rank reference) has one thread.\n\n"
        + markdown_table([{c: r.get(c, "") for c in columns} for r in history], columns)
        + "\n"
    )
    print(f"appended to {path}; report: {path.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help=f"comma list of {CONFIGS} (default: what this device runs)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; img/s is their median")
    parser.add_argument("--window-steps", type=int, default=8)
    parser.add_argument("--split-steps", type=int, default=5, help="steps of the instrumented per-part pass")
    parser.add_argument("--timeout-s", type=int, default=1200, help="per (config, mode) process")
    parser.add_argument("--csv", help="default: benchmarks/results/bench_step_<device>.csv")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument(
        "--world-sizes", help="a scaling sweep instead of the mode comparison, e.g. 1,2,4,8: --sweep-mode as "
        "torchrun jobs of that many ranks; scaling efficiency = img/s per rank / img/s of one rank",
    )  # fmt: skip
    parser.add_argument("--sweep-mode", default="eager", choices=MODES[1:3])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied after a paper config's own")
    args = parser.parse_args()
    if args.worker:
        args.config, args.mode = args.worker
        result = measure(args)
        if os.environ.get("RANK", "0") == "0":
            Path(args.result).write_text(json.dumps(result))
        return

    env = environment()
    print(format_environment(env), flush=True)
    configs = args.configs.split(",") if args.configs else (list(CONFIGS) if torch.cuda.is_available() else ["demo"])
    modes = args.modes.split(",")
    unknown = [c for c in configs if c not in CONFIGS] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown configs/modes {unknown}; choose from {CONFIGS} and {MODES}")
    if args.world_sizes:
        return sweep(args, configs, env)
    results = []
    for config in configs:
        if config != "demo" and not torch.cuda.is_available():
            print(f"config={config}: skipped (needs a CUDA device)", flush=True)
            continue
        for mode in modes:
            if results and past_deadline(f"config={config} mode={mode}"):  # one result at least
                break
            outcome = run_worker(config, mode, args)
            if isinstance(outcome, str):
                print(f"config={config} mode={mode}: failed ({outcome})", flush=True)
                continue
            print(f"config={config} mode={mode}: {outcome['img_per_s']:.2f} img/s", flush=True)
            results.append(outcome)
    if not results:
        sys.exit("bench_step: nothing was measured")
    rows = summarise(results, env)
    csv_path = Path(args.csv) if args.csv else RESULTS / f"bench_step_{device_slug(env['device'])}.csv"
    append_csv(csv_path, rows)
    columns = ["config", "mode", "student", "batch", "img_per_s", "vs_eager", "vs_naive", "mfu", "gflops_per_image"]
    columns += ["warmup_s", *(k for k in rows[0] if k.startswith("peak_")), *(f"{p}_ms" for p in PART_NAMES)]
    table = markdown_table(rows, columns)
    with csv_path.open() as handle:  # the report keeps every run recorded in this CSV, newest last
        history = list(csv.DictReader(handle))
    history_columns = ["date", "commit", "overrides", *columns]
    csv_path.with_suffix(".md").write_text(
        f"# bench_step on {env['device']}: the step three ways\n\nimg/s: median of timed windows of whole steps, "
        "synchronised only at their ends (`windows` in the CSV). The *_ms parts: a separate pass synchronised "
        "around each part. MFU: the engine's useful FLOPs per image x img/s / the device's dense bf16 peak. "
        "vs_eager / vs_naive compare modes of one run, measured one after the other.\n\n"
        + markdown_table([{c: r.get(c, "") for c in history_columns} for r in history], history_columns)
        + "\n"
        + "".join(
            f"\nInput stall of the last run, {config}: {s['stall']:.1%} (1 - compiled / synthetic img/s); compiled's "
            f"data wait {s['data_wait_ms']} ms per step.\n"
            for config, s in input_stalls(rows).items()
        )
    )
    plot(rows, csv_path.with_suffix(".png"), f"bench_step on {env['device']} ({env['commit']}, {env['date'][:10]})")
    print(table)
    for row in rows:
        print(f"config={row['config']} mode={row['mode']} img_per_s={row['img_per_s']} vs_eager={row['vs_eager']} "
              f"vs_naive={row['vs_naive']} mfu={row['mfu']}")  # fmt: skip
    for config, stall in input_stalls(rows).items():
        print(f"config={config} input_stall={stall['stall']} data_wait_ms={stall['data_wait_ms']}")
    print(f"appended to {csv_path}; report: {csv_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Every GPU measurement behind one command: GPU tests, the feature-loss, attention and step benchmarks.

    python benchmarks/run_gpu_suite.py [--out-dir benchmarks/results] [--archive FILE.tar.gz] [--pieces a,b]
    python benchmarks/run_gpu_suite.py --dry-run      # print what would run here and why, run nothing
    make gpu-suite GPU_SUITE_ARGS="--archive gpu_suite.tar.gz"   # then bring the archive back and commit it

Pieces, in order (each one a subprocess; a failing or timed-out piece is recorded and the next one runs):
    pytest-gpu          pytest -m gpu -q, tee'd to pytest_gpu_<device>.log (skipped without CUDA)
    bench_feature_loss  bench_feature_loss_<device>.{csv,md,png}
    bench_attention     bench_attention_<device>.{csv,md,png}
    bench_step          bench_step_<device>.{csv,md,png}: compiled / synthetic (the input stall) / eager / naive;
                        on CUDA the paper configs
    bench_input         bench_input_<device>.{csv,md,png}: every loader against ImageFolder, random-resized crops
    bench_input_center  bench_input_center_<device>.{csv,md,png}: the same with centre crops
    bench_epoch_start   bench_epoch_start_<device>.{csv,md}: the wait at each new epoch, next epoch started early
                        or at the end (on CUDA the paper step's shape: 256 px, batch 64, 8 workers, 167 ms a step)

Each piece's limit is its own (300 s; bench_step 600 s) or what is left of --budget-s, whichever is smaller. A
benchmark stops starting new cases a minute (at most a quarter of its limit) before it ($DTENGINE_BENCH_DEADLINE)
and writes what it measured; its status then says "cut short". A run that cannot hold every piece (little GPU time)
is split with --pieces into calls of a few pieces each.

Without CUDA the benchmarks run their --quick variants (a CPU check of the wiring, not a measurement) and the
GPU tests are reported as skipped. Every output name carries the device (e.g. nvidia-h100-80gb-hbm3), every CSV
row the device, commit and date. The summary (gpu_suite_<device>.md, also printed) says which pieces passed.

Works without a virtual environment, on a GPU box whose python3 has torch, triton, timm and pytest but not this
package or its pure-Python dependencies: `dtengine` is imported from the repository and `dtkernels` from
kernels/ through a link in a temporary folder, and wheels in --wheels (default .whl/ at the repository root,
filled by benchmarks/fetch_gpu_wheels.sh) are installed with `pip install --no-index --target` into another
temporary folder. A piece whose imports are still missing is skipped with the names. Only the standard library is
imported here, so this file runs under any python3.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# bench_step on CUDA: the paper configurations (the ADM-256 teacher network with random weights, ResNet-50 /
# ConvNeXt-B at 256 px, batch 64; no weights needed), each as compiled and synthetic (the input stall) first, so that
# a piece cut short by its deadline has measured them, then eager and naive. On a fresh machine the first compiled
# mode compiles for minutes and the synthetic one reuses its cache. Without CUDA: the demo at a small batch, one
# short window per mode, eager compile backend (a check of the wiring, not a measurement).
STEP_CUDA = ["--configs", "paper-r50,paper-convnext-b", "--modes", "compiled,synthetic,eager,naive"]
STEP_CUDA += ["--window-steps", "10", "--split-steps", "5"]
STEP_CPU = ["--configs", "demo", "--warmup", "1", "--windows", "1", "--window-steps", "1", "--split-steps", "1"]
STEP_CPU += ["data.batch_size=4", "data.num_workers=0", "compile.backend=aot_eager"]
# bench_input on CUDA: 2,000 generated JPEGs, 8 decoding workers (DALI: threads) per loader. Without CUDA: a few
# tiny images and batches (a check of the wiring, not a measurement).
INPUT_CUDA = ["--workers", "8"]
INPUT_CPU = ["--count", "24", "--batch", "4", "--size", "64", "--workers", "1", "--batches", "2", "--warmup", "1"]
INPUT_CPU += ["--rounds", "1"]
INPUT_MODULES = ("torch", "torchvision", "webdataset", "braceexpand", "simplejpeg", "matplotlib")
EPOCH_START_CUDA = ["--size", "256", "--images", "2048", "--batch", "64", "--workers", "8", "--step-ms", "167"]
EPOCH_START_CPU = ["--size", "32", "--images", "48", "--batch", "8", "--workers", "1", "--step-ms", "5"]
EPOCH_START_CPU += ["--epochs", "2"]
STATUS_WIDTH = 18
DEADLINE_ENV = "DTENGINE_BENCH_DEADLINE"  # read by benchmarks/common.py (this file imports the standard library only)
SAVE_MARGIN_S = 60  # a piece's deadline comes this long (at most a quarter of its limit) before its hard limit


@dataclass
class Context:
    """What every piece's command is built from."""

    python: str
    out_dir: Path
    device: str  # file-name form, e.g. "nvidia-h100-80gb-hbm3" or "cpu"
    cuda: bool


@dataclass
class Piece:
    """One step of the suite: a command, the modules it needs, and the files it writes."""

    name: str
    command: Callable[[Context], list[str]]
    outputs: Callable[[Context], list[Path]]
    modules: tuple[str, ...] = ()  # imports it cannot run without
    needs_cuda: bool = False
    timeout_s: int = 600
    log_name: str = ""  # "" = output goes to this process's stdout only; else also tee'd to out_dir/<name>


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed (rc N) | timed out | skipped: <why>
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def _bench(ctx: Context, script: str, *args: str) -> list[str]:
    return [ctx.python, str(BENCHMARKS / script), *args]


def _csv(ctx: Context, stem: str) -> Path:
    return ctx.out_dir / f"{stem}_{ctx.device}.csv"


def _with_report(path: Path, plot: bool = True) -> list[Path]:
    return [path, path.with_suffix(".md")] + ([path.with_suffix(".png")] if plot else [])


def _input_piece(name: str, crop: str) -> Piece:
    """bench_input with one kind of crop, writing <name>_<device>.{csv,md,png}."""
    return Piece(
        name,
        lambda c: _bench(
            c, "bench_input.py", "--crop", crop, "--csv", str(_csv(c, name)), *(INPUT_CUDA if c.cuda else INPUT_CPU)
        ),
        lambda c: _with_report(_csv(c, name)),
        modules=INPUT_MODULES,
        timeout_s=300,
    )


PIECES = [
    Piece(
        "pytest-gpu",
        lambda c: [
            c.python,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            str(ROOT / "tests"),
        ],  # fmt: skip
        lambda c: [c.out_dir / f"pytest_gpu_{c.device}.log"],
        needs_cuda=True,
        timeout_s=300,
        log_name="pytest_gpu_{device}.log",
    ),
    Piece(
        "bench_feature_loss",
        lambda c: (
            _bench(c, "bench_feature_loss.py", "--csv", str(_csv(c, "bench_feature_loss")))
            + ([] if c.cuda else ["--quick", "--batch", "1", "--reps", "2", "--no-compile", "--modes", "full"])
        ),
        lambda c: _with_report(_csv(c, "bench_feature_loss")),
        modules=("torch", "triton", "matplotlib"),
        timeout_s=300,
    ),
    Piece(
        "bench_attention",
        lambda c: (
            _bench(c, "bench_attention.py", "--csv", str(_csv(c, "bench_attention")))
            + ([] if c.cuda else ["--quick", "--repeats", "1"])
        ),
        lambda c: _with_report(_csv(c, "bench_attention")),
        modules=("torch", "triton", "matplotlib"),
        timeout_s=300,
    ),
    Piece(
        "bench_step",
        lambda c: _bench(c, "bench_step.py", "--csv", str(_csv(c, "bench_step")), *(STEP_CUDA if c.cuda else STEP_CPU)),
        lambda c: _with_report(_csv(c, "bench_step")),
        modules=("torch", "timm", "diffusers", "omegaconf", "yaml", *INPUT_MODULES),
        timeout_s=600,
    ),
    _input_piece("bench_input", "random_resized"),
    _input_piece("bench_input_center", "center"),
    Piece(
        "bench_epoch_start",
        lambda c: [
            *_bench(c, "bench_epoch_start.py", "--csv", str(_csv(c, "bench_epoch_start"))),
            *(EPOCH_START_CUDA if c.cuda else EPOCH_START_CPU),
        ],
        lambda c: _with_report(_csv(c, "bench_epoch_start"), plot=False),
        modules=("torch", "webdataset", "braceexpand", "simplejpeg"),
        timeout_s=300,
    ),
]


def device_slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def importable_environment(python: str, wheels: Path | None, scratch: Path) -> dict[str, str]:
    """os.environ plus a PYTHONPATH under which `python` imports dtengine, dtkernels and the brought wheels."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = []
    if wheels is not None and any(wheels.glob("*.whl")):
        site = scratch / "site"
        install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        found = sorted(wheels.glob("*.whl"))
        pip = subprocess.run([*install, "--target", str(site), *map(str, found)], capture_output=True, text=True)
        if pip.returncode == 0:
            paths.append(str(site))
            print(f"installed {len(found)} wheels from {wheels} into {site}")
        else:  # e.g. wheels fetched for another Python version: the pieces that need them are skipped by name
            reason = (pip.stderr.strip() or pip.stdout.strip() or f"exit code {pip.returncode}").splitlines()[-1]
            print(f"could not install the wheels in {wheels} ({reason}); going on without them")
    if subprocess.run([python, "-c", "import dtkernels, dtengine"], capture_output=True, env=env).returncode:
        # Not installed: the repository holds dtengine, and kernels/ is the dtkernels package (see setup.py).
        (scratch / "link").mkdir()
        (scratch / "link" / "dtkernels").symlink_to(ROOT / "kernels", target_is_directory=True)
        paths += [str(ROOT), str(scratch / "link")]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def probe(python: str, env: dict[str, str], modules: set[str]) -> tuple[str, set[str]]:
    """(CUDA device name or "", modules that do not import) as seen by `python`."""
    code = (
        "import importlib, sys\n"
        "missing = []\n"
        f"for name in {sorted(modules)!r}:\n"
        "    try: importlib.import_module(name)\n"
        "    except Exception: missing.append(name)\n"
        "device = ''\n"
        "if 'torch' not in missing:\n"
        "    import torch\n"
        "    device = torch.cuda.get_device_name() if torch.cuda.is_available() else ''\n"
        "print(device); print(' '.join(missing))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    device, missing = (out.splitlines() + ["", ""])[:2]
    return device.strip(), set(missing.split())


def run_piece(piece: Piece, ctx: Context, env: dict[str, str], timeout_s: float) -> str:
    """Run one piece, streaming its output (and tee-ing it to its log); returns its status."""
    command = piece.command(ctx)
    print(f"\n=== {piece.name}: {' '.join(command)}", flush=True)
    log = open(ctx.out_dir / piece.log_name.format(device=ctx.device), "w") if piece.log_name else None  # noqa: SIM115
    # The benchmarks stop starting new cases at the deadline and write what they measured; the hard limit after it
    # leaves them time to do so.
    env = {**env, DEADLINE_ENV: f"{time.time() + timeout_s - min(SAVE_MARGIN_S, timeout_s / 4):.0f}"}
    # Its own process group, so a timeout also ends the workers it started (compile workers, pytest subprocesses).
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    cut_short = threading.Event()

    def copy_output() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            if log:
                log.write(line)
            if f"time limit ({DEADLINE_ENV}) reached" in line:
                cut_short.set()

    pump = threading.Thread(target=copy_output, daemon=True)
    pump.start()
    try:
        proc.wait(timeout=timeout_s)
        status = "passed" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {timeout_s:.0f} s"
    pump.join(timeout=10)
    sys.stdout.flush()
    if log:
        log.close()
    return status + (", cut short by the time limit" if cut_short.is_set() else "")


def write_summary(outcomes: list[Outcome], ctx: Context, device_name: str, archive: Path | None) -> Path:
    lines = [f"# GPU suite on {device_name}", "", "| piece | status | seconds | files |", "|---|---|---|---|"]
    for o in outcomes:
        files = ", ".join(p.name for p in o.files if p.exists())
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.0f} | {files} |")
    path = ctx.out_dir / f"gpu_suite_{ctx.device}.md"
    path.write_text("\n".join(lines) + "\n")
    if archive is not None:  # rewritten after every piece, so a run killed at its limit still returns results
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            for p in [path, *(f for o in outcomes for f in o.files)]:
                if p.exists():
                    tar.add(p, arcname=p.name)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(BENCHMARKS / "results"), help="where every piece writes")
    parser.add_argument("--archive", default=None, help="also pack this run's files into this .tar.gz")
    parser.add_argument("--pieces", default=",".join(p.name for p in PIECES), help="comma-separated subset")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels to install first")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the pieces")
    parser.add_argument("--budget-s", type=float, default=570, help="total seconds; later pieces get what is left")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing, write nothing")
    args = parser.parse_args(argv)

    chosen = args.pieces.split(",")
    unknown = set(chosen) - {p.name for p in PIECES}
    if unknown:
        parser.error(f"unknown pieces {sorted(unknown)}; choose from {[p.name for p in PIECES]}")
    pieces = [p for p in PIECES if p.name in chosen]
    out_dir = Path(args.out_dir).resolve()
    archive = Path(args.archive).resolve() if args.archive else None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        wheels = Path(args.wheels) if Path(args.wheels).is_dir() and not args.dry_run else None
        env = importable_environment(args.python, wheels, Path(scratch))
        device_name, missing = probe(
            args.python, env, {"dtengine", "dtkernels", *(m for p in pieces for m in p.modules)}
        )
        cuda = bool(device_name)
        device_name = device_name or "cpu (no CUDA device: quick variants, GPU pieces skipped)"
        ctx = Context(args.python, out_dir, device_slug(device_name.split(" (")[0]), cuda)
        print(f"device={device_name} out_dir={out_dir} missing_modules={','.join(sorted(missing)) or 'none'}")
        if not args.dry_run:
            out_dir.mkdir(parents=True, exist_ok=True)

        outcomes: list[Outcome] = []
        for piece in pieces:
            lacking = sorted(set(piece.modules) & missing | {"dtengine", "dtkernels"} & missing)
            left = args.budget_s - (time.monotonic() - start)
            if piece.needs_cuda and not cuda:
                outcome = Outcome(piece.name, "skipped: needs CUDA")
            elif lacking:
                outcome = Outcome(piece.name, f"skipped: cannot import {', '.join(lacking)} (see --wheels)")
            elif left < 10:
                outcome = Outcome(piece.name, f"skipped: {args.budget_s:.0f} s budget spent")
            elif args.dry_run:
                outcome = Outcome(piece.name, "would run: " + " ".join(piece.command(ctx)))
            else:
                began = time.monotonic()
                status = run_piece(piece, ctx, env, min(piece.timeout_s, left))
                outcome = Outcome(piece.name, status, time.monotonic() - began, piece.outputs(ctx))
            outcomes.append(outcome)
            if not args.dry_run:
                write_summary(outcomes, ctx, device_name, archive)

    print(f"\n=== summary ({device_name})")
    for o in outcomes:
        print(f"{o.name:<{STATUS_WIDTH}} {o.status}" + (f" ({o.seconds:.0f} s)" if o.seconds else ""))
    if not args.dry_run:
        print(f"summary: {out_dir / f'gpu_suite_{ctx.device}.md'}" + (f"; archive: {archive}" if archive else ""))
    return 1 if any(o.status.startswith(("failed", "timed out")) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

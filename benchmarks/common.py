"""What every benchmark shares: device, versions, commit and date; the timer; CSV rows, markdown report, dtypes."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A Unix time by which a benchmark stops starting new cases and writes what it has measured. The GPU suite sets it
# for each piece ahead of the piece's hard limit, so a piece that runs long keeps its results instead of being killed.
DEADLINE_ENV = "DTENGINE_BENCH_DEADLINE"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seconds_to_deadline() -> float:
    """Seconds until $DTENGINE_BENCH_DEADLINE (negative once past), or infinity where it is not set."""
    deadline = os.environ.get(DEADLINE_ENV)
    return float("inf") if deadline is None else float(deadline) - time.time()


def past_deadline(next_case: str) -> bool:
    """True (and says so) once $DTENGINE_BENCH_DEADLINE has passed: the caller stops before `next_case`."""
    if seconds_to_deadline() > 0:
        return False
    print(f"time limit ({DEADLINE_ENV}) reached: stopped before {next_case}; writing what was measured", flush=True)
    return True


def environment() -> dict[str, str]:
    """device, torch, triton, python, commit, date: the columns every CSV row starts with.

    The commit is `git rev-parse --short HEAD` (with "+dirty" when the engine, kernels or benchmarks have
    uncommitted changes), or $DTENGINE_COMMIT where that is set (a GPU box that gets a copy of the working tree
    has no .git), else "unknown".
    """
    commit = os.environ.get("DTENGINE_COMMIT", "")
    try:
        if not commit:
            git = ["git", "-C", str(RESULTS.parent.parent)]
            commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
            commit = commit.stdout.strip()
            # Uncommitted changes to the code make the row's code differ from the commit's: say so.
            changed = subprocess.run([*git, "status", "--porcelain", "--", "dtengine", "kernels", "benchmarks/*.py"],
                                     capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
            commit += "+dirty" if changed else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def device_slug(device: str) -> str:
    """The device as a file-name part: "cpu" for any CPU, "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    if device.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def format_environment(env: dict) -> str:
    """The one-line `key=value ...` form every benchmark prints first and puts under its report's title."""
    return " ".join(f"{k}={v}" for k, v in env.items())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock section timer that synchronises the device before reading the clock."""

    def __init__(self, device: torch.device):
        self.device, self.totals = device, {}

    def section(self, name: str):
        timer = self

        class _Section:
            def __enter__(self):
                synchronize(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Section()


def time_ms(
    fn: Callable[[], object], device: torch.device, reps: int, grad_to_none: Sequence[torch.Tensor] = ()
) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of fn(): triton's do_bench on CUDA, a synchronised wall clock elsewhere.

    The CPU path runs fn once to warm up (and compile), then `reps` timed calls; `grad_to_none` tensors get their
    .grad cleared before each call on both paths, so backward timings do not include gradient accumulation.
    """
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grad_to_none))
        return p50, p20, p80
    fn()
    samples = []
    for _ in range(reps):
        for x in grad_to_none:
            x.grad = None
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(1000 * (time.perf_counter() - start))
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: index 1 = p20, 7 = p80
    return statistics.median(samples), cuts[1], cuts[7]


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows; when their columns differ from the file's header, rewrite the file with the union of both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns, old_rows = list(rows[0]), []
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            old_rows, header = list(reader), list(reader.fieldnames or [])
        if header == columns:
            with path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=columns).writerows(rows)
            return
        columns = header + [c for c in columns if c not in header]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def save_results(csv_path: Path, rows: list[dict], columns: list[str], title: str, env: dict, note: str = "") -> None:
    """Append `rows` to the CSV, write this run's markdown report next to it (title, environment line, optional
    note, table of `columns`) and print the table."""
    append_csv(csv_path, rows)
    table = markdown_table(rows, columns)
    report = csv_path.with_suffix(".md")
    report.write_text(f"# {title}\n\n{format_environment(env)}\n\n" + (f"{note}\n\n" if note else "") + f"{table}\n")
    print(table)
    print(f"appended to {csv_path}; report: {report}")


def save_figure(fig, path: Path) -> None:
    """Lay out, write (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

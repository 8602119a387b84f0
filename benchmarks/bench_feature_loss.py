"""Benchmark the feature-regression loss: eager reference, torch.compile'd reference, fused Triton kernel.

    python benchmarks/bench_feature_loss.py                  # paper levels at batch 64 + a sweep
    python benchmarks/bench_feature_loss.py --quick          # batch 2, paper levels only: a minute or two on CPU

Modes: fwd (the loss; for Triton this includes computing d loss / d r), bwd (backward alone), full (both).
Cases: the paper's teacher levels at 256 px (1024x8x8, 1024x16x16, 512x32x32, 512x64x64) one at a time and all
four in one call, plus a sweep over channels and sizes (odd ones included). Times are p50 [p20, p80] in ms
(triton.testing.do_bench on GPU, a synchronised wall-clock timer on CPU). GB/s is the fused kernel's bytes model
(`dtkernels.feature_loss.bytes_moved`) divided by the time, for every provider, so it compares times on one
scale; % of peak only where the device's peak is known. Peak extra memory is CUDA's peak allocation above the
inputs (na on CPU). On CPU only the reference providers run: Triton needs CUDA.

Appends CSV rows (device, commit, date, versions) to benchmarks/results/bench_feature_loss.csv, writes this run's
markdown table and a plot next to it, and ends with one summary line per measured case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtengine.ops import feature_regression_loss, feature_regression_loss_reference  # noqa: E402
from dtkernels.feature_loss import bytes_moved  # noqa: E402

from common import (  # noqa: E402
    DTYPES,
    RESULTS,
    default_device,
    environment,
    format_environment,
    past_deadline,
    save_results,
    time_ms,
)

PAPER_LEVELS = [(1024, 8, 8), (1024, 16, 16), (512, 32, 32), (512, 64, 64)]  # (C, H, W) at 256 px
SWEEP_LEVELS = [(256, 32, 32), (768, 24, 24), (384, 47, 33), (1280, 16, 16)]
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM HBM peaks; PCIe cards get "na"
MODES = ("fwd", "bwd", "full")
CPU_NOTE = "CPU run: reference providers only (Triton needs CUDA); CPU figures are not GPU claims. "


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda" or "PCIe" in torch.cuda.get_device_name(device):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BYTES_PER_S.items() if key in name), None)


def cases(batch: int, quick: bool) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
    """(label, level shapes) per case: each paper level, the four together, then the sweep."""
    label = lambda c, h, w: f"{batch}x{c}x{h}x{w}"  # noqa: E731
    found = [(label(*level), [(batch, *level)]) for level in PAPER_LEVELS]
    found.append((f"{batch}x[paper-4-levels]", [(batch, *level) for level in PAPER_LEVELS]))
    if not quick:
        found += [(label(*level), [(batch, *level)]) for level in SWEEP_LEVELS]
    return found


def providers(device: torch.device, compile_reference: bool) -> dict:
    """name -> loss function of (student list, teacher list) returning a 0-dim loss."""
    found = {"eager": lambda s, t: feature_regression_loss_reference(s, t).loss}
    if compile_reference:
        # bwd mode replays one graph with retain_graph=True, which donated (reused) backward buffers forbid.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        compiled = torch.compile(feature_regression_loss_reference)
        found["compiled"] = lambda s, t: compiled(s, t).loss
    if device.type == "cuda":
        found["triton"] = lambda s, t: feature_regression_loss(s, t, backend="triton").loss
    return found


def measure(loss_fn, shapes, dtype, device, mode: str, reps: int) -> dict:
    torch.manual_seed(0)
    student = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    teacher = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    if mode == "fwd":
        run = lambda: loss_fn(student, teacher)  # noqa: E731
    elif mode == "full":
        run = lambda: loss_fn(student, teacher).backward()  # noqa: E731
    else:
        loss = loss_fn(student, teacher)
        run = lambda: loss.backward(retain_graph=True)  # noqa: E731
    p50, p20, p80 = time_ms(run, device, reps, student)
    extra = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if device.type == "cuda" else None
    return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "peak_extra_mib": extra}


def fmt(value, digits: int = 3) -> str:
    return "na" if value is None else f"{value:.{digits}g}"


def summary_row(env: dict, name: str, mode: str, label: str, dtype, results: dict, moved: int, peak) -> dict:
    """One CSV row: times, GB/s under the bytes model, % of peak, and speed-ups over the baselines."""
    result = results[name]
    gbps = moved / (result["ms_p50"] / 1000) / 1e9
    speedup = {base: results[base]["ms_p50"] / result["ms_p50"] for base in ("eager", "compiled") if base in results}
    return {
        **env,
        "provider": name,
        "mode": mode,
        "shape": label,
        "dtype": str(dtype).removeprefix("torch."),
        **{key: fmt(result[key], 4) for key in ("ms_p50", "ms_p20", "ms_p80")},
        "gbps": fmt(gbps),
        "pct_peak": fmt(peak and 100 * gbps * 1e9 / peak),
        "peak_extra_mib": fmt(result["peak_extra_mib"], 5),
        "vs_eager": fmt(speedup.get("eager")),
        "vs_compiled": fmt(speedup.get("compiled")),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [row for row in rows if row["mode"] == "full"]
    labels = list(dict.fromkeys(row["shape"] for row in full))
    names = list(dict.fromkeys(row["provider"] for row in full))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        times = {row["shape"]: float(row["ms_p50"]) for row in full if row["provider"] == name}
        ax.bar(
            [j + i * width for j in range(len(labels))], [times.get(label, 0) for label in labels], width, label=name
        )
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward p50 (ms)")
    ax.set_title(f"feature_regression_loss on {rows[0]['device']} ({rows[0]['dtype']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default 64, or 2 with --quick")
    parser.add_argument("--quick", action="store_true", help="small batch, paper levels only, few repetitions")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=int, default=None, help="CPU timer repetitions (default 10, 3 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--csv", default=str(RESULTS / "bench_feature_loss.csv"))
    args = parser.parse_args()

    device = default_device()
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (2 if args.quick else 64)
    reps = args.reps or (3 if args.quick else 10)
    env = environment()
    print(format_environment(env))
    if device.type != "cuda":
        print("no CUDA device: measuring the reference providers only; the Triton kernel needs CUDA")
    peak = peak_bandwidth(device)
    found = providers(device, compile_reference=not args.no_compile)

    rows = []
    for index, (label, shapes) in enumerate(cases(batch, args.quick)):
        if index and past_deadline(f"case {label}"):  # one case at least
            break
        for mode in args.modes.split(","):
            results = {name: measure(fn, shapes, dtype, device, mode, reps) for name, fn in found.items()}
            moved = bytes_moved(shapes, dtype.itemsize, dtype.itemsize, mode)
            rows += [
                summary_row(env, name, mode, label, dtype, results, moved, peak) for name in results
            ]  # fmt: skip

    csv_path = Path(args.csv)
    columns = ["provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "gbps", "pct_peak"]
    columns += ["peak_extra_mib", "vs_eager", "vs_compiled"]
    note = f"Device: {env['device']}. {'' if device.type == 'cuda' else CPU_NOTE}"
    note += "GB/s is the fused kernel's bytes model over the time, for every provider."
    save_results(csv_path, rows, columns, "bench_feature_loss (latest run)", env, note)
    plot(rows, csv_path.with_suffix(".png"))
    for row in rows:
        print(
            f"provider={row['provider']} mode={row['mode']} shape={row['shape']} ms={row['ms_p50']} gbps={row['gbps']} "
            f"pct_peak={row['pct_peak']} vs_eager={row['vs_eager']} vs_compiled={row['vs_compiled']}"
        )


if __name__ == "__main__":
    main()

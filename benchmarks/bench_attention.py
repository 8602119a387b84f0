"""Attention throughput: dtengine's Triton kernel against SDPA's backends, xformers and the eager math reference.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16] [--csv benchmarks/results/bench_attention_cuda.csv]

TFLOP/s with the forward counted as 4*B*H*N^2*D and the backward as 2.5x that, at the teachers' attention
shapes (ADM: N=1024, D=64; Stable Diffusion at 512 px: N=4096, D=40/80/160; DiT: N=256, D=72) and a sweep over N
at D=64. Appends to --csv (default benchmarks/results/bench_attention_<cpu|cuda>.csv), writes the run's .md and
.png next to it, and ends with one
line per case: provider=<name> n=<N> d=<D> mode=<fwd|bwd> tflops=<x> vs_best_peer=<ratio>, where the peers are
SDPA's backends and xformers (a provider is never its own peer).

On CPU only SDPA (default dispatch), SDPA's math backend and the eager reference run; Triton and xformers need
CUDA and are listed as not measurable. `--quick` shrinks the shapes (N / 4, sweep to 1024; B*H = 2) so a CPU run
takes a minute or two; CPU figures say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtengine.ops import attention, attention_reference  # noqa: E402
from dtengine.ops.attention import ATTENTION_BACKENDS  # noqa: E402

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

# name -> (B, H, N, D)
TEACHER_SHAPES = {
    "ADM-256": (8, 4, 1024, 64),
    "SD-512 D40": (2, 8, 4096, 40),
    "SD-512 D80": (2, 8, 4096, 80),
    "SD-512 D160": (2, 8, 4096, 160),
    "DiT-XL": (32, 16, 256, 72),
}
SWEEP_N = (256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_SWEEP_N = (64, 128, 256, 512, 1024)
SWEEP_TOKENS = 65536  # B*H*N of every sweep point, so each keeps the GPU busy
PEERS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers")


def cases(quick: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(name, (B, H, N, D)) of every measured case."""
    if quick:  # N / 4, B*H = 2: a CPU run in a minute or two
        found = [(name, (1, 2, n // 4, d)) for name, (_, _, n, d) in TEACHER_SHAPES.items()]
        return found + [(f"sweep N={n}", (1, 2, n, 64)) for n in QUICK_SWEEP_N]
    found = list(TEACHER_SHAPES.items())
    return found + [(f"sweep N={n}", (max(1, SWEEP_TOKENS // (n * 16)), 16, n, 64)) for n in SWEEP_N]


def _autotuned(q, k, v):
    from dtengine.runtime.flags import override

    with override(attention_autotune=True):
        return attention(q, k, v, backend="triton")


def providers(device: torch.device) -> dict[str, Callable | str]:
    """name -> attention function, or the reason it cannot be measured here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    found: dict[str, Callable | str] = {}
    probe = torch.zeros(1, 1, 64, 64, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name in ("triton", "xformers"):
        reason = ATTENTION_BACKENDS.unavailable[name](probe)
        found[name] = reason or (lambda q, k, v, name=name: attention(q, k, v, backend=name))
    # The same kernel with its forward tiles autotuned per shape (DTENGINE_ATTENTION_AUTOTUNE=1): whether that beats
    # the shipped table decides if it becomes the default. Its first call per shape times the tiles (warm-up).
    found["triton-autotuned"] = found["triton"] if isinstance(found["triton"], str) else _autotuned
    found["sdpa"] = F.scaled_dot_product_attention
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        found[f"sdpa-{name}"] = sdpa_with(backend) if device.type == "cuda" else "SDPA's fused kernels need CUDA"
    found["sdpa-cudnn"] = (
        sdpa_with(SDPBackend.CUDNN_ATTENTION) if device.type == "cuda" else "cuDNN attention needs CUDA"
    )
    found["sdpa-math"] = sdpa_with(SDPBackend.MATH)
    found["eager-math"] = lambda q, k, v: attention_reference(q, k, v).to(q.dtype)
    return found


def measure(fn: Callable, shape, dtype, device, repeats) -> dict[str, float]:
    """Forward and backward milliseconds of one provider at one shape."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    fwd = time_ms(lambda: fn(q, k, v), device, repeats)[0]
    out = fn(q, k, v)
    grad = torch.randn_like(out)
    bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), device, repeats)[0]
    return {"fwd": fwd, "bwd": bwd}


def run(args) -> tuple[dict, list[dict]]:
    """(environment incl. dtype, one row per case x provider x mode)."""
    device = default_device()
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    env = {**environment(), "dtype": str(dtype).removeprefix("torch.")}
    print(format_environment(env), flush=True)
    rows = []
    available = providers(device)
    for index, (case, shape) in enumerate(cases(args.quick)):
        if index and past_deadline(f"case {case}"):  # one case at least
            break
        batch, heads, n, d = shape
        flops = {"fwd": 4 * batch * heads * n * n * d, "bwd": 2.5 * 4 * batch * heads * n * n * d}
        for name, fn in available.items():
            note, times = "", {}
            if isinstance(fn, str):
                note = f"not measurable: {fn}"
            else:
                try:
                    times = measure(fn, shape, dtype, device, args.repeats)
                except (RuntimeError, ValueError) as err:  # e.g. an SDPA backend refusing this shape
                    note = f"not measurable: {str(err).strip().splitlines()[0][:100]}"
            for mode in ("fwd", "bwd"):
                ms = times.get(mode)
                rows.append(
                    {
                        **env,
                        "case": case,
                        "B": batch,
                        "H": heads,
                        "N": n,
                        "D": d,
                        "provider": name,
                        "mode": mode,
                        "ms": f"{ms:.4f}" if ms else "",
                        "tflops": f"{flops[mode] / ms / 1e9:.4f}" if ms else "",
                        "note": note,
                    }
                )
        print(f"measured {case} {shape}", flush=True)
    return env, rows


def add_peer_ratios(rows: list[dict]) -> None:
    for row in rows:
        same = [r for r in rows if (r["case"], r["mode"]) == (row["case"], row["mode"]) and r["tflops"]]
        peers = [float(r["tflops"]) for r in same if r["provider"] in PEERS and r["provider"] != row["provider"]]
        row["vs_best_peer"] = f"{float(row['tflops']) / max(peers):.3f}" if row["tflops"] and peers else ""


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    sweep = [r for r in rows if r["case"].startswith("sweep") and r["tflops"]]
    for ax, mode in zip(axes, ("fwd", "bwd")):
        for provider in dict.fromkeys(r["provider"] for r in sweep):
            points = sorted(
                (r["N"], float(r["tflops"])) for r in sweep if r["provider"] == provider and r["mode"] == mode
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set(xscale="log", xlabel="N (tokens), D=64", title=f"{mode} on {device}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (for CPU and smoke tests)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="CUDA only; CPU runs fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on CPU")
    parser.add_argument("--csv", default=None, help="default benchmarks/results/bench_attention_<cpu|cuda>.csv")
    args = parser.parse_args()

    env, rows = run(args)
    add_peer_ratios(rows)
    kind = default_device().type
    csv_path = Path(args.csv or RESULTS / f"bench_attention_{kind}.csv")
    columns = ["case", "B", "H", "N", "D", "provider", "mode", "ms", "tflops", "vs_best_peer", "note"]
    save_results(csv_path, rows, columns, f"Attention benchmark ({kind.upper()})", {**env, "quick": args.quick})
    plot(rows, csv_path.with_suffix(".png"), env["device"])
    for row in rows:
        print(
            f"provider={row['provider']} n={row['N']} d={row['D']} mode={row['mode']} "
            f"tflops={row['tflops'] or 'n/a'} vs_best_peer={row['vs_best_peer'] or 'n/a'}"
        )


if __name__ == "__main__":
    main()

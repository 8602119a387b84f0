"""What the compiler makes of both Triton kernels for A100 (sm_80) and H100 (sm_90), without a GPU.

The launchers run on CPU tensors of the shapes, dtypes and layouts the engine passes; their launches are captured
and compiled ahead of time exactly as a real launch specialises them (`dtkernels.aot`). Per kernel and config:
registers, spilled bytes, shared memory, CTAs per SM, global load / store widths (count x bits, LDGSTS included),
whether tiles are copied with cp.async or TMA, wgmma shapes, SASS instructions and barriers per loop body.

Nothing here is a timing: it is what the GPU would be given to run, read from the code. The committed output,
docs/kernel_aot_report.md, is the kernels' AOT baseline.

    python benchmarks/kernel_report.py                    # print, and write docs/kernel_aot_report.md
    python benchmarks/kernel_report.py --arch 90 --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtkernels.aot import ARCHES, capture_launches, compile_launch  # noqa: E402
from dtkernels.attention import HEAD_DIMS, attention_backward, attention_forward  # noqa: E402
from dtkernels.feature_loss.launcher import feature_loss_backward, feature_loss_forward  # noqa: E402

from common import environment, format_environment, markdown_table  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "docs" / "kernel_aot_report.md"
# (D, N) of the teachers the engine supports: ADM-256 D=64 up to N=1024, SD D=40/80/160 up to N=4096, DiT D=72 at
# N=256; 32 and 128 complete the shipped table. N only changes the grid, not the compiled code (N % 16 == 0).
ATTENTION_SEQ = {32: 1024, 40: 4096, 64: 1024, 72: 256, 80: 1024, 128: 1024, 160: 256}
# Levels of an ADM-256 teacher regressed at 256 px, batch 32, in the student's bf16: C=512 at 32x32 and 16x16,
# C=1024 at 8x8.
LOSS_LEVELS = [(32, 512, 32, 32), (32, 512, 16, 16), (32, 1024, 8, 8)]
COLUMNS = ["kernel", "config", "regs", "spill", "smem KB", "CTAs/SM", "loads", "stores", "async", "wgmma", "loop",
           "bar/loop"]  # fmt: skip


def row(label: str, launch, result) -> dict:
    def widths(counts: dict[int, int]) -> str:
        return " ".join(f"{count}x{bits}" for bits, count in sorted(counts.items())) or "-"

    copies = "+".join(name for name, used in (("cp.async", result.cp_async), ("TMA", result.tma)) if used) or "-"
    return {
        "kernel": f"{label} {result.name.strip('_').removesuffix('_kernel')}",
        "config": launch.options(),
        "regs": result.registers,
        "spill": result.local_bytes + result.stack_bytes,
        "smem KB": f"{result.shared_bytes / 1024:.1f}",
        "CTAs/SM": result.ctas_per_sm,
        "loads": widths(result.global_loads),
        "stores": widths(result.global_stores),
        "async": copies,
        "wgmma": " ".join(result.wgmma_shapes) or "-",
        "loop": "/".join(map(str, result.loop_instructions)) or "-",
        "bar/loop": "/".join(map(str, result.loop_barriers)) or "-",
    }


def attention_rows(arch: int) -> list[dict]:
    rows = []
    for head_dim in HEAD_DIMS:
        seq_len, scale = ATTENTION_SEQ[head_dim], head_dim**-0.5
        # The teacher's (B, N, H, D) projections viewed as (B, H, N, D): what the engine passes.
        q, k, v = (torch.empty(2, seq_len, 8, head_dim, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        with capture_launches() as launches:
            out, lse = attention_forward(q, k, v, scale)
            attention_backward(torch.empty_like(out), q, k, v, out, lse, scale, deterministic=False)
        with capture_launches() as deterministic:  # the path without atomics: its dK/dV and dQ kernels
            attention_backward(torch.empty_like(out), q, k, v, out, lse, scale, deterministic=True)
        launches += [launch for launch in deterministic if launch.kwargs.get("ATOMIC_DQ") is not None or
                     launch.name.endswith("dq_kernel")]  # fmt: skip
        rows += [row(f"D={head_dim} N={seq_len}", launch, compile_launch(launch, arch)) for launch in launches]
    return rows


def tma_rows(arch: int) -> list[dict]:
    """The forward reading through TMA descriptors (DTENGINE_ATTENTION_TMA=1; sm_90 and newer only)."""
    rows = []
    for head_dim in HEAD_DIMS:
        seq_len = ATTENTION_SEQ[head_dim]
        q, k, v = (torch.empty(2, seq_len, 8, head_dim, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        with capture_launches() as launches:
            attention_forward(q, k, v, head_dim**-0.5, tma=True)
        rows += [row(f"D={head_dim} N={seq_len} TMA", launch, compile_launch(launch, arch)) for launch in launches]
    return rows


def loss_rows(arch: int) -> list[dict]:
    rows = []
    for layout, memory_format in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        rs = [torch.empty(shape, dtype=torch.bfloat16).contiguous(memory_format=memory_format) for shape in LOSS_LEVELS]
        gs = [r.clone() for r in rs]
        with capture_launches() as launches:  # one launch per kernel covers every level
            out = feature_loss_forward(rs, gs, at_weight=10.0, whiten=True, layernorm_eps=1e-5, norm_eps=1e-6)
            feature_loss_backward(torch.ones(()), rs, gs, out.stats)
        # The autotuned pixel kernels: every tile config, as autotuning compiles them. A loop per level.
        rows += [row(f"{layout} {len(rs)} levels", launch, compile_launch(launch, arch)) for launch in launches]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHES, help="default: every arch")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {REPORT.name}")
    args = parser.parse_args()
    env = environment()
    sections = [
        "# Kernel AOT report",
        "",
        "Compiled ahead of time, on a machine without a GPU, exactly as real launches specialise the kernels",
        "(`benchmarks/kernel_report.py`, `make kernel-report`). No timing: registers, spills, shared memory, CTAs",
        "per SM, global load / store widths (count x bits per thread, cp.async copies included), asynchronous",
        "copies, wgmma shapes, SASS instructions per loop body and CTA-wide barriers (BAR) per loop body, read",
        "from the compiled code.",
        "",
        f"Environment: {format_environment(env)}",
    ]
    for arch in args.arch or ARCHES:
        sections += [
            "",
            f"## sm_{arch}: attention (bf16, the teacher's (B, N, H, D) view; forward, delta, dK/dV adding dQ with "
            "atomics (`ATOMIC_DQ=True`; at D=160 a dQ kernel follows), then the deterministic path's dK/dV and dQ)",
            "",
            markdown_table(attention_rows(arch), COLUMNS),
            "",
            *(
                [
                    f"## sm_{arch}: attention forward through TMA descriptors (opt-in; `loop` also counts the "
                    "mbarrier wait loops)",
                    "",
                    markdown_table(tma_rows(arch), COLUMNS),
                    "",
                ]
                if arch >= 90
                else []
            ),
            f"## sm_{arch}: fused feature loss (bf16 r and g, whitened, 3 levels in one launch per kernel; forward and "
            "backward, every tile config; `loop` lists each level's channel loop)",
            "",
            markdown_table(loss_rows(arch), COLUMNS),
        ]
    text = "\n".join(sections) + "\n"
    print(text)
    if not args.no_write:
        REPORT.write_text(text)
        print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()

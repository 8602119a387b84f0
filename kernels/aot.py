"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

`triton.compile` lowers a kernel to PTX and runs the bundled `ptxas` for a chosen `GPUTarget`, so a CPU-only
machine can check what only hardware would otherwise reveal: compile errors, shared memory beyond the
device's opt-in limit, register spills (reported by the bundled `cuobjdump -res-usage` as LOCAL / STACK
bytes), and, on sm_90, whether `tl.dot` lowered to Hopper's `wgmma` instructions.

Each kernel module lists the configurations it ships; its tests pass them here one by one.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Opt-in shared memory per block (bytes), from the CUDA programming guide's compute-capability table.
MAX_SHARED_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
ARCHES = (80, 90)  # A100, H100: the targets every shipped configuration is compiled for
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class CompiledKernel:
    """What one ahead-of-time compile produced, for one kernel, configuration and architecture."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory Triton asks for at launch
    registers: int  # per thread
    stack_bytes: int
    local_bytes: int  # local memory per thread: > 0 means ptxas spilled registers
    uses_wgmma: bool  # sm_90 only: tl.dot lowered to warpgroup MMA

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def fits_shared_memory(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES[self.arch]

    def problems(self) -> list[str]:
        """Human-readable reasons this configuration should not ship (empty when it is fine)."""
        found = []
        if not self.fits_shared_memory:
            found.append(
                f"needs {self.shared_bytes} B shared memory, sm_{self.arch} allows {MAX_SHARED_BYTES[self.arch]}"
            )
        if self.spills:
            found.append(f"spills registers (LOCAL {self.local_bytes} B, STACK {self.stack_bytes} B per thread)")
        return found

    def summary(self) -> str:
        return (
            f"{self.name} sm_{self.arch} warps={self.num_warps} stages={self.num_stages} regs={self.registers} "
            f"shared={self.shared_bytes} local={self.local_bytes} wgmma={self.uses_wgmma}"
        )


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the (single) function in `cubin`, via cuobjdump."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    match = _RES_USAGE.search(out)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    registers, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": registers, "stack": stack, "shared": shared, "local": local}


def compile_kernel(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    *,
    arch: int,
    num_warps: int = 4,
    num_stages: int = 2,
    divisible_by_16: tuple[str, ...] = (),
) -> CompiledKernel:
    """Compile `fn` (a `@triton.jit` function, not an autotuner) for `sm_<arch>` and inspect the result.

    Args:
        fn: the jitted kernel.
        signature: Triton type string per runtime argument, e.g. {"x_ptr": "*bf16", "n": "i32"}.
        constexprs: values for the `tl.constexpr` arguments.
        arch: compute capability as an int (80, 90).
        divisible_by_16: arguments a real launch sees as multiples of 16 (pointers from torch allocations, strides
            and sizes divisible by 16). The JIT specialises on this at run time; without it, loads cannot be
            vectorised or software-pipelined (no cp.async / TMA), and registers and shared memory differ.
    """
    jit_fn = fn  # accept an @autotune / @heuristics wrapper: compile the kernel inside
    while not isinstance(jit_fn, triton.runtime.JITFunction) and hasattr(jit_fn, "fn"):
        jit_fn = jit_fn.fn
    attrs = {(jit_fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    usage = resource_usage(compiled.asm["cubin"])
    return CompiledKernel(
        name=jit_fn.__name__,
        arch=arch,
        num_warps=num_warps,
        num_stages=num_stages,
        shared_bytes=int(compiled.metadata.shared),
        registers=usage["registers"],
        stack_bytes=usage["stack"],
        local_bytes=usage["local"],
        uses_wgmma="wgmma" in compiled.asm["ptx"],
    )

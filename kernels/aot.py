"""Ahead-of-time compilation of the kernels exactly as real launches compile them, on a machine without a GPU.

A launch specialises a kernel on its arguments before compiling: an int equal to 1 becomes a constant, pointers
whose address and ints whose value divide by 16 get a divisibility hint, and nothing else. Those hints decide
whether loads are vectorised and pipelined, so a compile with hints chosen by hand checks another program.
Here the launchers themselves run, on CPU tensors of the real shapes, dtypes, strides and storage offsets,
inside `capture_launches()`, which records each kernel launch instead of running it (and, for an autotuned
kernel, one launch per configuration, as autotuning compiles them all). `compile_launch` then specialises the
recorded arguments with Triton's own launch binder and compiles for a chosen `GPUTarget` (sm_80, sm_90) with the
bundled `ptxas`. CPU allocations are at least 64-byte aligned and CUDA's 256-byte, so every address is
16-divisible exactly when a GPU launch's would be.

The result is read from the cubin and PTX: registers, spills, shared memory and CTAs per SM (the occupancy
calculator's limits), global load and store widths from the SASS (a 16-bit load of bf16 data is one element at a
time), whether tiles are copied with cp.async or TMA, the wgmma shapes on sm_90, and the SASS instructions in
each loop body (a backward branch and its target).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from dtkernels import interpreter

ARCHES = (80, 90)  # A100, H100: the targets every shipped configuration is compiled for


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of the CUDA occupancy calculator (CUDA programming guide, compute-capability table)."""

    shared_per_sm: int  # bytes usable by blocks
    shared_per_block: int  # opt-in maximum for one block
    registers: int = 65_536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_shared_per_block: int = 1024  # the runtime's own share of every block


SM_LIMITS = {80: SMLimits(167_936, 166_912), 86: SMLimits(102_400, 101_376), 90: SMLimits(233_472, 232_448)}
MAX_SHARED_BYTES = {arch: limits.shared_per_block for arch, limits in SM_LIMITS.items()}
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)")


@dataclass(frozen=True)
class CapturedLaunch:
    """One kernel launch as a launcher made it: the jitted kernel and its arguments (constexprs and launch
    options included)."""

    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def options(self) -> str:
        """The launch's constexprs and launch options, e.g. "BLOCK_M=128 BLOCK_N=64 warps=4 stages=3"."""
        values = {k: v for k, v in self.kwargs.items() if k not in ("num_warps", "num_stages") and k.isupper()}
        values.update(warps=self.kwargs.get("num_warps", 4), stages=self.kwargs.get("num_stages", 3))
        return " ".join(f"{k}={v}" for k, v in values.items())


@contextlib.contextmanager
def capture_launches(every_config: bool = True) -> Iterator[list[CapturedLaunch]]:
    """Inside the block, kernel launches are recorded into the yielded list instead of running; launchers accept
    CPU tensors (see `interpreter.can_run_on`). Outputs stay unwritten, so only launchers whose later launches do
    not depend on earlier results can be captured in one go. An autotuned launch is recorded once per
    configuration its early prune keeps (autotuning compiles them all), or once, with its first configuration,
    when `every_config` is False (to count launches); heuristics wrappers add the values they compute."""
    launches: list[CapturedLaunch] = []

    def record(kernel, *args, grid=None, warmup=False, **kwargs):
        launches.append(CapturedLaunch(kernel, args, kwargs))

    def record_every_config(tuner, *args, grid=None, warmup=False, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if every_config else tuner.configs[:1]  # what autotuning compiles
        for config in configs:
            kernel, options = _apply_heuristics(tuner.fn, args, {**kwargs, **config.all_kwargs()})
            record(kernel, *args, **options)

    jit_run, tuner_run = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, record_every_config
    interpreter.CAPTURING = True
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        interpreter.CAPTURING = False


def _apply_heuristics(kernel, args: tuple, kwargs: dict) -> tuple[JITFunction, dict]:
    """The jitted kernel under `triton.heuristics` wrappers, and the launch options with the values they set."""
    while not isinstance(kernel, JITFunction):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        kwargs = {**kwargs, **{name: rule(named) for name, rule in kernel.values.items()}}
        kernel = kernel.fn
    return kernel, kwargs


@dataclass(frozen=True)
class CompiledKernel:
    """What one ahead-of-time compile produced, for one launch and architecture."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory Triton asks for at launch
    registers: int  # per thread
    stack_bytes: int
    local_bytes: int  # local memory per thread: > 0 means ptxas spilled registers
    uses_wgmma: bool  # sm_90 only: tl.dot lowered to warpgroup MMA
    wgmma_shapes: tuple[str, ...] = ()  # e.g. ("m64n64k16",)
    global_loads: dict[int, int] = field(default_factory=dict)  # SASS LDG and LDGSTS count per width in bits
    global_stores: dict[int, int] = field(default_factory=dict)  # SASS STG count per width in bits
    cp_async: bool = False  # tiles copied global -> shared asynchronously (LDGSTS)
    tma: bool = False  # tiles copied by the tensor memory accelerator (UTMALDG)
    loop_instructions: tuple[int, ...] = ()  # SASS instructions per loop body, outermost first
    loop_barriers: tuple[int, ...] = ()  # BAR (CTA-wide barrier) instructions per loop body, same order
    specialization: str = ""  # the launch's divisibility hints and constants, as Triton derived them

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def fits_shared_memory(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES[self.arch]

    @property
    def ctas_per_sm(self) -> int:
        """Blocks resident per SM, by the occupancy calculator's register, warp, shared-memory and block limits."""
        limits = SM_LIMITS[self.arch]
        registers_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256  # allocated in units of 256
        by_registers = (limits.registers // registers_per_warp) // self.num_warps
        by_warps = limits.max_warps // self.num_warps
        by_shared = limits.shared_per_sm // (self.shared_bytes + limits.reserved_shared_per_block)
        return max(0, min(by_registers, by_warps, by_shared, limits.max_blocks))

    @property
    def narrow_loads(self) -> int:
        """Global loads narrower than 32 bits: 16-bit data read one element at a time."""
        return sum(count for bits, count in self.global_loads.items() if bits < 32)

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
        loads = ",".join(f"{count}x{bits}" for bits, count in sorted(self.global_loads.items())) or "-"
        stores = ",".join(f"{count}x{bits}" for bits, count in sorted(self.global_stores.items())) or "-"
        copies = "+".join(name for name, used in (("cp.async", self.cp_async), ("tma", self.tma)) if used) or "-"
        return (
            f"{self.name} sm_{self.arch} warps={self.num_warps} stages={self.num_stages} regs={self.registers} "
            f"spill={self.local_bytes + self.stack_bytes} smem={self.shared_bytes} ctas/sm={self.ctas_per_sm} "
            f"ldg={loads} stg={stores} async={copies} wgmma={','.join(self.wgmma_shapes) or '-'} "
            f"loop={'/'.join(map(str, self.loop_instructions)) or '-'} "
            f"loop_barriers={'/'.join(map(str, self.loop_barriers)) or '-'}"
        )


def _bundled_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        return subprocess.run(
            [_bundled_tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True
        ).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the (single) function in `cubin`, via cuobjdump."""
    out = _cuobjdump(cubin, "-res-usage")
    match = _RES_USAGE.search(out)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    registers, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": registers, "stack": stack, "shared": shared, "local": local}


def _access_bits(opcode: str) -> int:
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in opcode:
            return bits
    return 32


@dataclass(frozen=True)
class SassFacts:
    loads: dict[int, int]
    stores: dict[int, int]
    cp_async: bool
    tma: bool
    loops: tuple[int, ...]
    loop_barriers: tuple[int, ...] = ()


def sass_facts(sass: str) -> SassFacts:
    """Load / store widths, asynchronous copies and loop sizes of a kernel's SASS (`cuobjdump -sass`)."""
    instructions = [(int(address, 16), opcode, operands) for address, opcode, operands in _SASS_LINE.findall(sass)]
    loads = Counter(_access_bits(op) for _, op, _ in instructions if op.startswith("LDG"))
    stores = Counter(_access_bits(op) for _, op, _ in instructions if op.startswith("STG"))
    opcodes = {op.split(".")[0] for _, op, _ in instructions}
    addresses = [address for address, _, _ in instructions]
    barriers = [address for address, opcode, _ in instructions if opcode.startswith("BAR")]
    loops = []
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(?:`\()?.*?0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:  # a backward branch closes a loop
            start = int(target.group(1), 16)
            in_loop = sum(start <= a <= address for a in barriers)
            loops.append((start, sum(start <= a <= address for a in addresses), in_loop))
    return SassFacts(
        loads=dict(loads),
        stores=dict(stores),
        cp_async="LDGSTS" in opcodes,
        tma=bool(opcodes & {"UTMALDG", "UBLKCP"}),
        loops=tuple(size for _, size, _ in sorted(loops)),
        loop_barriers=tuple(count for _, _, count in sorted(loops)),
    )


def _specialise(launch: CapturedLaunch, arch: int):
    """(backend options, signature, constexprs, attributes, cache key) of `launch` on `sm_<arch>`, as
    JITFunction.run derives them."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = (kernel.__name__, str(specialization), str(sorted(options.items())), arch)
    # `_pack_args` is the step of JITFunction.run between binding and compiling: using it keeps the signature,
    # constants and divisibility attributes exactly those of a launch.
    return (*kernel._pack_args(backend, kwargs, bound, specialization, options), key)


_COMPILED: dict[tuple, CompiledKernel] = {}


def compile_launch(launch: CapturedLaunch, arch: int) -> CompiledKernel:
    """Compile a captured launch for `sm_<arch>`, specialised by Triton's own launch binder, and inspect it.
    Launches that specialise alike compile once per process, as Triton's own cache would have it."""
    options, signature, constexprs, attrs, key = _specialise(launch, arch)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(launch.kernel, arch, options, signature, constexprs, attrs)
    return _COMPILED[key]


def _argument(kernel: JITFunction, path: tuple[int, ...]) -> str:
    """The argument at a specialisation path: `(i,)` is the i-th argument, `(i, j)` entry j of a tuple argument."""
    return kernel.arg_names[path[0]] + "".join(f"[{index}]" for index in path[1:])


def _compile(kernel: JITFunction, arch: int, options, signature, constexprs, attrs) -> CompiledKernel:
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    facts = sass_facts(_cuobjdump(compiled.asm["cubin"], "-sass"))
    ptx = compiled.asm["ptx"]
    hinted = [_argument(kernel, path) for path, value in attrs.items() if value]
    constants = [
        f"{_argument(kernel, path)}={v}" for path, v in constexprs.items() if not kernel.params[path[0]].is_constexpr
    ]
    return CompiledKernel(
        name=kernel.__name__,
        arch=arch,
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        shared_bytes=int(compiled.metadata.shared),
        registers=usage["registers"],
        stack_bytes=usage["stack"],
        local_bytes=usage["local"],
        uses_wgmma="wgmma" in ptx,
        wgmma_shapes=tuple(sorted(set(_WGMMA.findall(ptx)))),
        global_loads=facts.loads,
        global_stores=facts.stores,
        cp_async=facts.cp_async or "cp.async.cg" in ptx or "cp.async.ca" in ptx,
        tma=facts.tma or "cp.async.bulk.tensor" in ptx,
        loop_instructions=facts.loops,
        loop_barriers=facts.loop_barriers,
        specialization=f"divisible by 16: {','.join(hinted) or '-'}; constants: {','.join(constants) or '-'}",
    )

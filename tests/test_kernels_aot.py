"""The ahead-of-time compile every kernel's AOT test uses (no GPU needed): launches captured from real tensors
and specialised by Triton's own binder, and what is read from the compiled code."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dtkernels.aot import (  # noqa: E402
    ARCHES,
    MAX_SHARED_BYTES,
    CompiledKernel,
    capture_launches,
    compile_launch,
    sass_facts,
)


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets * stride, mask=mask) * 2, mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + idx[:, None] * BLOCK + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * BLOCK + idx[None, :])
    tl.store(c_ptr + idx[:, None] * BLOCK + idx[None, :], tl.dot(a, b))


def scale_launch(x: torch.Tensor, n: int):
    with capture_launches() as launches:
        _scale_kernel[(1,)](x, torch.empty_like(x), n, x.stride(0), BLOCK=1024, num_warps=4)
    (launch,) = launches
    return launch


@pytest.mark.parametrize("arch", ARCHES)
def test_a_launch_is_specialised_as_triton_launches_it(arch):
    aligned = compile_launch(scale_launch(torch.empty(4096, dtype=torch.bfloat16), 4096), arch)
    assert aligned.name == "_scale_kernel" and aligned.arch == arch and aligned.num_warps == 4
    # The stride is 1, so a constant; the pointers and n divide by 16: 128-bit vector loads.
    assert "stride=1" in aligned.specialization and "x_ptr,y_ptr,n" in aligned.specialization
    assert aligned.global_loads and min(aligned.global_loads) == 128 and aligned.narrow_loads == 0
    # One element into the buffer, and an n that does not divide by 16: no hint, one element per load.
    shifted = compile_launch(scale_launch(torch.empty(4097, dtype=torch.bfloat16)[1:], 4095), arch)
    assert "x_ptr" not in shifted.specialization and shifted.narrow_loads > 0
    assert 0 < aligned.registers <= 255 and aligned.problems() == [] and not aligned.uses_wgmma
    assert aligned.ctas_per_sm == 16  # few registers, no shared memory: 64 warps per SM, 4 per block


def test_an_autotuned_kernel_is_captured_once_per_config():
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": 256}, num_warps=2), triton.Config({"BLOCK": 512}, num_warps=4)], key=["n"]
    )(_scale_kernel)
    x = torch.empty(1024)
    with capture_launches() as launches:
        tuned[(1,)](x, torch.empty_like(x), 1024, 1)
    assert [(launch.kwargs["BLOCK"], launch.kwargs["num_warps"]) for launch in launches] == [(256, 2), (512, 4)]
    assert launches[1].options() == "BLOCK=512 warps=4 stages=3"


def test_dot_lowers_to_wgmma_on_sm90_only():
    a, b, c = torch.empty(64, 64, dtype=torch.bfloat16), torch.empty(64, 64, dtype=torch.bfloat16), torch.empty(64, 64)
    with capture_launches() as launches:
        _dot_kernel[(1,)](a, b, c, BLOCK=64, num_warps=4, num_stages=1)
    hopper, ampere = compile_launch(launches[0], 90), compile_launch(launches[0], 80)
    assert hopper.uses_wgmma and hopper.wgmma_shapes == ("m64n64k16",) and not ampere.uses_wgmma


def test_sass_facts_read_widths_async_copies_and_loops():
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0028*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    facts = sass_facts(sass)
    assert facts.loads == {128: 2, 16: 1} and facts.stores == {64: 1}  # LDGSTS is a global load too
    assert facts.cp_async and not facts.tma and facts.loops == (4,)  # 0x10..0x30; BRA to itself is no loop
    assert facts.loop_barriers == (1,)


def test_problems_and_occupancy():
    fields = dict(name="k", arch=80, num_warps=4, num_stages=2, registers=255, stack_bytes=0, uses_wgmma=False)
    too_big = CompiledKernel(shared_bytes=MAX_SHARED_BYTES[80] + 1, local_bytes=0, **fields)
    spilling = CompiledKernel(shared_bytes=0, local_bytes=16, **fields)
    assert "shared memory" in too_big.problems()[0] and too_big.ctas_per_sm == 0
    assert "spills" in spilling.problems()[0]
    # 255 registers x 32 threads -> 8192 per warp: 8 warps fit the register file, 2 blocks of 4.
    assert spilling.ctas_per_sm == 2

"""The ahead-of-time compile helper every kernel's AOT test uses (no GPU needed)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dtkernels.aot import ARCHES, MAX_SHARED_BYTES, CompiledKernel, compile_kernel  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + idx[:, None] * BLOCK + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * BLOCK + idx[None, :])
    tl.store(c_ptr + idx[:, None] * BLOCK + idx[None, :], tl.dot(a, b))


@pytest.mark.parametrize("arch", ARCHES)
def test_compiles_and_reports_resources(arch):
    sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32"}
    result = compile_kernel(_scale_kernel, sig, {"BLOCK": 1024}, arch=arch, num_warps=4)
    assert result.name == "_scale_kernel" and result.arch == arch and result.num_warps == 4
    assert 0 < result.registers <= 255
    assert result.problems() == []
    assert not result.uses_wgmma


def test_dot_lowers_to_wgmma_on_sm90_only():
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
    hopper = compile_kernel(_dot_kernel, sig, {"BLOCK": 64}, arch=90, num_warps=4, num_stages=1)
    ampere = compile_kernel(_dot_kernel, sig, {"BLOCK": 64}, arch=80, num_warps=4, num_stages=1)
    assert hopper.uses_wgmma and not ampere.uses_wgmma


def test_problems_name_shared_memory_overflow_and_spills():
    fields = dict(name="k", arch=80, num_warps=4, num_stages=2, registers=255, stack_bytes=0, uses_wgmma=False)
    too_big = CompiledKernel(shared_bytes=MAX_SHARED_BYTES[80] + 1, local_bytes=0, **fields)
    spilling = CompiledKernel(shared_bytes=0, local_bytes=16, **fields)
    assert "shared memory" in too_big.problems()[0]
    assert "spills" in spilling.problems()[0]
